"""The forwarder: SEGs in outbox/ sent on by C-STORE (``--forward``), retried with back-off,
kept on disk until accepted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from attunet_deploy.apps.dicom.scp import SUCCESS
from attunet_deploy.apps.dicom.state import NodeState
from attunet_deploy.errors import InputError

FORWARD_BACKOFF_MAX_S = 60.0


@dataclass
class ForwardTarget:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ForwardTarget:
        m = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if not m or not 0 < int(m.group(3)) < 65536:
            raise InputError(f"--forward {text!r}: use AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(m.group(1), m.group(2), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Forwarder(NodeState):
    """outbox/ -> the forward destination -> sent/."""

    # ------------------------------------------------------------------ forwarder
    def _forwarder(self) -> None:
        delay = 0.0
        next_try = 0.0
        while not self.stop.is_set():
            try:
                pending = sorted(self.dirs["outbox"].glob("*.dcm"), key=lambda p: p.stat().st_mtime)
            except OSError:  # a file went away between glob and stat
                self.stop.wait(0.2)
                continue
            if not pending or time.monotonic() < next_try:
                self.stop.wait(0.2)
                continue
            f = pending[0]
            try:
                ok, why = self._send(f)
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {str(exc)[:120]}"
            if ok:
                with contextlib.suppress(OSError):
                    os.replace(f, self.dirs["sent"] / f.name)
                self.metrics.count("segs_forwarded")
                self.log("sent", f"{f.name} forwarded to {self.forward}", seg=str(f))
                delay = 0.0
            else:
                delay = min(FORWARD_BACKOFF_MAX_S, max(1.0, delay * 2))
                next_try = time.monotonic() + delay
                self.log("retry", f"{f.name} not forwarded to {self.forward} ({why}); next try in {delay:g} s",
                         seg=str(f))

    def _send(self, path: Path) -> tuple[bool, str]:
        import pydicom
        from pynetdicom import AE

        assert self.forward is not None
        ds = pydicom.dcmread(str(path))
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(self.forward.host, self.forward.port, ae_title=self.forward.ae_title)
        if not assoc.is_established:
            return False, "association not established"
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(getattr(status, "Status", -1)) if status else -1
        return (code == SUCCESS, f"status 0x{code:04X}" if code >= 0 else "no response")
