"""Orthanc, the open-source PACS sites run, as a peer for system tests: Debian's ``orthanc`` 1.10 with
its DICOMweb plugin (``orthanc-dicomweb``), started on free ports with its own configuration and
storage folder, and stopped by pid.

Orthanc 1.10 has no option to bind its DICOM port to one address: it listens on every interface, on
a random free port, for the few seconds of a test; its HTTP API refuses remote clients
(``RemoteAccessAllowed: false``) and, where a test asks, basic authentication guards it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else why a test skips."""
    if not ORTHANC.is_file():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does this)"
    if not DICOMWEB_PLUGIN.is_file():
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


class Orthanc:
    """One Orthanc process: ``start()``, its REST API (``get``/``post``), ``stop()`` (by pid)."""

    def __init__(self, root: Path, modalities: dict[str, tuple[str, str, int]] | None = None, *,
                 aet: str = "ORTHANC", user: tuple[str, str] | None = None, tls: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.root = root
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = aet
        self.user = user
        root.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "attunet-deploy test PACS", "DicomAet": aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomCheckCalledAet": True,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "StableAge": 2, "SaveJobs": False, "LimitJobs": 10, "ConcurrentJobs": 2,
            "AuthenticationEnabled": user is not None,
            "RegisteredUsers": {user[0]: user[1]} if user else {}, "HttpTimeout": 30,
            "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 0,
        }
        if tls:
            config.update({"DicomTlsEnabled": True, "DicomTlsCertificate": tls["cert"],
                           "DicomTlsPrivateKey": tls["key"], "DicomTlsTrustedCertificates": tls["trusted"],
                           "DicomTlsRemoteCertificateRequired": bool(tls.get("require_client", False))})
        config.update(extra or {})
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                 timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.user:
            token = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path) or b"null")

    def post(self, path: str, data: Any, timeout: float = 120.0) -> Any:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        ctype = "application/dicom" if isinstance(data, bytes) else "application/json"
        out = self._request("POST", path, body, ctype, timeout)
        return json.loads(out) if out.strip() else None

    def upload(self, files: list[Path]) -> list[str]:
        """Store files through the REST API (POST /instances); returns the Orthanc instance ids."""
        return [self.post("/instances", f.read_bytes())["ID"] for f in files]

    def push_study(self, study_id: str, modality: str, permissive: bool = False) -> Any:
        """Orthanc's "send study to a modality" (C-STORE of every instance), synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": [study_id], "Permissive": permissive,
                                                           "Synchronous": True})

    def study_of(self, study_uid: str) -> str | None:
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return found[0] if found else None

    def instances_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance filed under the study: its SOP class and modality (simplified tags)."""
        sid = self.study_of(study_uid)
        if sid is None:
            return []
        out = []
        for inst in self.get(f"/studies/{sid}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"id": inst["ID"], "SOPClassUID": tags.get("SOPClassUID"), "Modality": tags.get("Modality"),
                        "SeriesInstanceUID": tags.get("SeriesInstanceUID")})
        return out

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
