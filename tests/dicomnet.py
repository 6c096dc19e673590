"""Real DICOM networking on 127.0.0.1 for the node's tests: the node as a process, DCMTK as the
scanner (storescu/echoscu/dcmcjpeg) and as the PACS (storescp), all called by absolute path
(pynetdicom's own apps of the same names shadow them inside a venv), and dicom3tools' dciodvfy
as the judge of every SEG. DCMTK's storescp 3.6.7 has no option to bind one address, so it runs
in its inetd mode (``-id``) behind a listener of ours on 127.0.0.1: one storescp per association.
Every process a helper starts is stopped by it, by pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PY = sys.executable
DCMTK = {name: f"/usr/bin/{name}" for name in ("storescu", "echoscu", "dcmcjpeg", "storescp")}
DCIODVFY = "/usr/bin/dciodvfy"


def need_tools(*names: str) -> None:
    """Skip (with the install line) where a DCMTK / dicom3tools binary is missing."""
    for name in names:
        path = DCIODVFY if name == "dciodvfy" else DCMTK[name]
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} missing: apt-get install -y dcmtk dicom3tools")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def node(bundle: Path, out: Path, *extra: str, port: int | None = None, quiet: float = 1.0,
         env: dict[str, str] | None = None) -> Iterator[tuple[int, Path, subprocess.Popen]]:
    """attdeploy serve-dicom on 127.0.0.1; stopped with SIGTERM (or already killed) by the test."""
    port = port or free_port()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"node-{port}-{time.time_ns()}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, "-m", "attunet_deploy.cli", "serve-dicom", "-b", str(bundle), "--out", str(out),
                                 "--port", str(port), "--bind", "127.0.0.1", "--quiet-seconds", str(quiet),
                                 "--backend", "ort", "--min-free-mb", "16", *extra], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: "listening" in log.read_text() or proc.poll() is not None, 60, "the node to listen")
        assert proc.poll() is None, log.read_text()
        yield port, log, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


#: storescp processes per PACS folder: a received file counts once its association has ended.
_PACS: dict[Path, list[subprocess.Popen]] = {}


@contextmanager
def storescp(folder: Path, ae: str = "PACS", port: int | None = None) -> Iterator[int]:
    """The PACS: DCMTK's storescp (inetd mode) behind a listener on 127.0.0.1; stopped by pid."""
    import threading

    folder.mkdir(parents=True, exist_ok=True)
    procs = _PACS.setdefault(folder.resolve(), [])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port or 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                procs.append(subprocess.Popen([DCMTK["storescp"], "-id", "-aet", ae, "-od", str(folder)],
                                              stdin=conn.fileno(), stdout=conn.fileno(), stderr=subprocess.DEVNULL))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        wait_for(lambda: echo(srv.getsockname()[1], ae) == 0, 30, "storescp")
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)
        srv.close()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=30)


def echo(port: int, ae: str = "ATTDEPLOY", *extra: str, timeout: float = 60) -> int:
    """DCMTK echoscu's exit status (0: the C-ECHO succeeded)."""
    return subprocess.run([DCMTK["echoscu"], "-aec", ae, "-to", "10", "-ta", "10", "-td", "10", *extra,
                           "127.0.0.1", str(port)], capture_output=True, timeout=timeout).returncode


def storescu(port: int, *paths: Path, ae: str = "ATTDEPLOY", extra: tuple[str, ...] = ()) -> list[str]:
    """Send files with DCMTK storescu; returns the C-STORE statuses it received ("0x0000", ...).

    DCMTK's storescu stops at the first failure status, so a mixed batch should end with the bad file
    (or be sent one file per call).
    """
    proc = subprocess.run([DCMTK["storescu"], "-d", "-aec", ae, "-to", "10", "-ta", "10", "-td", "30", *extra,
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True, text=True, timeout=300)
    return [s.upper().replace("0X", "0x") for s in
            re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", proc.stdout + proc.stderr)]


def dciodvfy_errors(path: Path) -> list[str]:
    """dicom3tools' dciodvfy: the Error lines it prints for ``path`` (empty: valid)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def craft(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of the DICOM file ``src`` with attributes changed (None deletes one); invalid values
    are written as given, which is the point."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src)
        for keyword, value in changes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
        dst.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=False)
    return dst


def events(log: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for ln in text.splitlines():
        if ln.startswith(want + " "):
            return float(ln.split()[-1])
    return 0.0


def pacs_segs(folder: Path) -> list[Path]:
    """Files the PACS received completely (none while one of its associations is still open)."""
    if any(proc.poll() is None for proc in _PACS.get(folder.resolve(), [])):
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file())


#: The series a scanner pushes for one study, beside the axial series a model is made for, and the
#: built-in rule of the acceptance gate that refuses each.
STUDY_OTHERS = {"scout": "localizer", "mip": "derived", "coronal": "orientation", "single": "slices"}


def write_study(root: Path, axial_slices: int = 24, size: tuple[int, int] = (128, 128), seed: int = 5,
                axial_thickness: float = 2.5) -> dict[str, list[Any]]:
    """One study as a CT scanner sends it: the axial series, a scout (LOCALIZER), a MIP
    (DERIVED\\SECONDARY), a coronal reformat (PRIMARY, coronal orientation) and a 1-slice series, each
    in ``root/<name>``. Returns each series' slices (demo/ctseries.py's SeriesSlice)."""
    from pydicom.uid import generate_uid

    from attunet_deploy.demo.ctseries import SeriesGeometry, SeriesHeader, write_ct_series

    study = generate_uid()
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    plan = {"axial": (axial_slices, ("ORIGINAL", "PRIMARY", "AXIAL"), "Abdomen 2.5mm", SeriesGeometry(
                spacing=axial_thickness)),
            "scout": (1, ("ORIGINAL", "PRIMARY", "LOCALIZER"), "Topogram", SeriesGeometry()),
            "mip": (6, ("DERIVED", "SECONDARY", "AXIAL", "MIP"), "Abdomen MIP 10mm", SeriesGeometry(spacing=10.0)),
            "coronal": (6, ("ORIGINAL", "PRIMARY", "OTHER"), "Abdomen cor 3mm", SeriesGeometry(
                spacing=3.0, orientation=coronal)),
            "single": (1, ("ORIGINAL", "PRIMARY", "AXIAL"), "Abdomen 2.5mm key image", SeriesGeometry())}
    out = {}
    for number, (name, (n, image_type, description, geometry)) in enumerate(plan.items(), start=1):
        header = SeriesHeader(study_uid=study, series_number=number, series_description=description,
                              image_type=image_type)
        out[name] = write_ct_series(root / name, n, size, seed + number, header=header, geometry=geometry)
    return out


def contour_masks(rtstruct: Path, slices: list[Any], roi_number: int) -> np.ndarray:
    """The masks an RTSTRUCT's contours of one ROI enclose, rasterised independently of the writer with
    ``skimage.draw.polygon`` (patient mm -> pixel rows/columns through each referenced slice's
    position and orientation; several contours on a slice combine even-odd, so holes stay holes)."""
    import pydicom
    from skimage.draw import polygon

    ds = pydicom.dcmread(rtstruct)
    by_uid = {s.sop_instance_uid: i for i, s in enumerate(slices)}
    shape = slices[0].hu.shape
    out = np.zeros((len(slices), *shape), dtype=bool)
    headers = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in slices]
    (roi,) = [r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == roi_number]
    for contour in getattr(roi, "ContourSequence", []):
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        k = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        h = headers[k]
        origin = np.asarray(h.ImagePositionPatient, dtype=float)
        o = np.asarray(h.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (float(v) for v in h.PixelSpacing)
        pts = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) - origin
        cols, rows = pts @ o[:3] / col_spacing, pts @ o[3:] / row_spacing
        rr, cc = polygon(rows, cols, shape)
        fill = np.zeros(shape, dtype=bool)
        fill[rr, cc] = True
        out[k] ^= fill
    return out


def make_certs(d: Path) -> dict[str, Path]:
    """A test CA and a server and a client certificate it signed (for 127.0.0.1 and localhost), made
    with openssl in ``d``; skips where openssl is missing."""
    import shutil

    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl missing: apt-get install -y openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=attdeploy test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {k: d / k for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


#: What else a CT study holds, by SOP class: an MR series, an X-Ray Radiation Dose SR, a secondary capture.
OTHER_OBJECTS = {"mr": ("1.2.840.10008.5.1.4.1.1.4", "MR"), "dose": ("1.2.840.10008.5.1.4.1.1.88.67", "SR"),
                 "sc": ("1.2.840.10008.5.1.4.1.1.7", "OT")}


def write_other_objects(folder: Path, like: Path, count: int = 2) -> dict[str, list[Path]]:
    """``count`` instances of each of OTHER_OBJECTS in the study (and of the patient) of the CT file
    ``like``, one series per kind: minimal but well-formed (UIDs, patient and study modules; images
    with 32x32 pixel data, the SR with an empty content tree), as a PACS stores them."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = pydicom.dcmread(like, stop_before_pixels=True)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for number, (kind, (sop_class, modality)) in enumerate(OTHER_OBJECTS.items(), start=20):
        series = generate_uid()
        for k in range(count):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = sop_class
            for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
                setattr(ds, key, getattr(ct, key, ""))
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber, ds.Modality = series, number, k + 1, modality
            if kind == "dose":
                ds.ValueType, ds.ContentDate, ds.ContentTime = "CONTAINER", "20261208", "120000"
                ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
            else:
                ds.Rows = ds.Columns = 32
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                ds.PixelData = np.full((32, 32), 100 * (k + 1), np.uint16).tobytes()
            path = folder / f"{kind}_{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.setdefault(kind, []).append(path)
    return out
