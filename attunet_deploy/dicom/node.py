"""``attdeploy serve-dicom``: a Storage SCP that turns CT series into DICOM SEG.

Folders under ``--out`` hold the node's state on disk, so a restart (even after ``kill -9``)
loses nothing that was acknowledged:

- ``incoming/<series>/``  instances written (temp file + rename + fsync) *before* Success is returned
- ``processing/<series>/`` a series that has been quiet for ``--quiet-seconds``, queued for the worker
- ``seg/``                the DICOM SEGs written
- ``outbox/``             SEGs waiting to be forwarded (``--forward``), retried with back-off
- ``sent/``, ``archive/<series>/``, ``failed/<series>/``  forwarded SEGs, processed and refused series

DICOM has no "series complete" message: a series counts as complete when no instance of it
arrived for ``--quiet-seconds`` (MONAI Deploy's gateway waits 5 s, Orthanc's StableAge 60 s).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import InputError
from ..fileio import atomic_path, fsync_dir
from .series import CT_IMAGE_STORAGE, header_of, order_slices, segment_volume, unusable_reason

#: C-STORE statuses (PS3.4 Annex B, PS3.7 Annex C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
FORWARD_BACKOFF_MAX_S = 60.0
#: Masks computed ahead of a series' completion, at most this many bytes kept in memory.
PRESEGMENT_CACHE_BYTES = 256 << 20
PRESEGMENT_BATCH = 8


def _instance_key(path: Path) -> tuple[str, int, int] | None:
    """Identity of a received instance file that survives the move of its folder (a resend of the
    same SOP instance changes size or mtime, so its old mask is not reused)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return path.name, st.st_size, st.st_mtime_ns


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


def check_ae_title(title: str, what: str = "--ae-title") -> str:
    if not 1 <= len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title) or not title.strip():
        raise InputError(f"{what} {title!r}: an AE title is 1-16 printable ASCII characters")
    return title


def _safe_uid(uid: str) -> str:
    return re.sub(r"[^0-9.]", "_", uid)[:120] or "unknown"


class NodeLog:
    """One line per event on stderr: plain text, or JSON objects with --log-json."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def __call__(self, event: str, message: str, **fields: Any) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        if self.as_json:
            line = json.dumps({"time": now, "event": event, "message": message, **fields}, default=str)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{now} {event}: {message}" + (f" ({extra})" if extra else "")
        with self.lock:
            print(line, file=self.stream, flush=True)


class DicomNode:
    """The Storage SCP, the quiet-period scheduler, one segmentation worker and the forwarder."""

    def __init__(self, bundle: Bundle, out: str | os.PathLike[str], *, port: int = 11112,
                 ae_title: str = "ATTDEPLOY", bind: str = "0.0.0.0", allow_ae: list[str] | None = None,
                 quiet_seconds: float = 5.0, forward: str | None = None, log_json: bool = False,
                 backend: str = "auto", precision: str = "fp32", segment_label: str = "Target",
                 runner_options: dict[str, Any] | None = None) -> None:
        if not 0 < port < 65536:
            raise InputError(f"--port {port}: must be in 1..65535")
        if not 0.1 <= quiet_seconds <= 3600:
            raise InputError(f"--quiet-seconds {quiet_seconds}: must be in 0.1..3600")
        self.bundle = bundle
        self.out = Path(out)
        self.port = port
        self.ae_title = check_ae_title(ae_title)
        self.bind = bind
        self.allow_ae = [check_ae_title(a, "--allow-ae") for a in (allow_ae or [])]
        self.quiet = float(quiet_seconds)
        self.forward = ForwardTarget.parse(forward) if forward else None
        self.log = NodeLog(log_json)
        self.backend, self.precision = backend, precision
        self.segment_label = segment_label
        self.runner_options = runner_options or {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writers: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.jobs: queue.Queue[Path] = queue.Queue()
        self.queued: set[str] = set()
        #: masks segmented while a series was still arriving (2D model: slices are independent)
        self.masks: dict[tuple[str, int, int], Any] = {}
        self.mask_bytes = 0
        self.dirs = {name: self.out / name for name in ("incoming", "processing", "seg", "outbox", "sent",
                                                          "archive", "failed")}

    # ------------------------------------------------------------------ storage SCP
    def _handle_store(self, event: Any) -> int:
        calling = str(getattr(event.assoc.requestor, "ae_title", "?")).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if sop_class != CT_IMAGE_STORAGE:
            self.log("refused", "only CT Image Storage is segmented", sop_class=sop_class, sop_instance=sop_uid,
                     calling_ae=calling, status="0x0122")
            return SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:
            self.log("refused", f"cannot decode the dataset: {str(exc)[:120]}", sop_instance=sop_uid,
                     calling_ae=calling, status="0xC000")
            return CANNOT_UNDERSTAND
        from .series import has_pixel_data

        inst = header_of(ds, Path(f"{sop_uid}.dcm"), has_pixel_data(ds))
        if str(getattr(ds, "SOPClassUID", "")) != sop_class:
            self.log("refused", "dataset's SOP Class UID differs from the C-STORE request", sop_instance=sop_uid,
                     calling_ae=calling, status="0xA900")
            return DATASET_DOES_NOT_MATCH
        reason = unusable_reason(inst)
        if reason:
            self.log("refused", reason, sop_instance=sop_uid, calling_ae=calling, status="0xC000")
            return CANNOT_UNDERSTAND
        series = _safe_uid(inst.series_uid)
        with self.lock:
            self.writers[series] = self.writers.get(series, 0) + 1
        try:
            target = self.dirs["incoming"] / series / f"{_safe_uid(sop_uid)}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(event.encoded_dataset(include_meta=True))  # keeps the transfer syntax
        except OSError as exc:
            self.log("refused", f"cannot write the instance: {exc}", sop_instance=sop_uid, status="0xA700")
            return OUT_OF_RESOURCES
        finally:
            with self.lock:
                self.writers[series] -= 1
                self.last_seen[series] = time.monotonic()
        self.log("received", f"CT instance {inst.instance_number or '?'} of series {inst.series_uid}",
                 sop_instance=sop_uid, calling_ae=calling, path=str(target))
        return SUCCESS

    def _handle_rejected(self, event: Any) -> None:
        self.log("rejected", "association refused", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                 address=event.assoc.requestor.address)

    def _ae(self) -> Any:
        from pynetdicom import AE, StoragePresentationContexts, VerificationPresentationContexts

        ae = AE(ae_title=self.ae_title)
        syntaxes = accepted_transfer_syntaxes()
        for ctx in StoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, syntaxes)
        for ctx in VerificationPresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax)
        if self.allow_ae:
            ae.require_calling_aet = self.allow_ae
        ae.maximum_associations = 16
        return ae

    # ------------------------------------------------------------------ scheduling
    def _recover(self) -> None:
        """Pick up what a previous run left: queued series, unfinished incoming series."""
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for job in sorted(self.dirs["processing"].iterdir()):
            if job.is_dir():
                self._queue(job)
                self.log("recovered", f"series {job.name} queued again after a restart")
        now = time.monotonic()
        for series in sorted(self.dirs["incoming"].iterdir()):
            if series.is_dir():
                age = max((time.time() - f.stat().st_mtime for f in series.glob("*.dcm")), default=self.quiet)
                self.last_seen[series.name] = now - min(age, self.quiet)
        for f in self.dirs["outbox"].glob("*.dcm"):
            self.log("recovered", f"{f.name} waits to be forwarded")

    def _queue(self, job: Path) -> None:
        if job.name not in self.queued:
            self.queued.add(job.name)
            self.jobs.put(job)

    def _seal_quiet_series(self) -> None:
        now = time.monotonic()
        with self.lock:
            for series, seen in list(self.last_seen.items()):
                if self.writers.get(series, 0) or now - seen < self.quiet:
                    continue
                src = self.dirs["incoming"] / series
                del self.last_seen[series]
                if not src.is_dir():
                    continue
                dst = self.dirs["processing"] / series
                n = 1
                while dst.exists():  # late instances of a series already queued: a batch of their own
                    n += 1
                    dst = self.dirs["processing"] / f"{series}.{n}"
                os.replace(src, dst)
                fsync_dir(self.dirs["processing"])
                count = len(list(dst.glob("*.dcm")))
                self.log("complete", f"series {series}: {count} instance(s), quiet for {self.quiet:g} s",
                         series=series, instances=count)
                self._queue(dst)

    # ------------------------------------------------------------------ worker
    def _worker(self, runner: Any) -> None:
        import numpy as np

        with runner:
            # First-call costs now rather than on the first series: the backend's buffers for a batch of
            # 512x512 slices, and highdicom's import (about a second).
            runner.infer(np.zeros((PRESEGMENT_BATCH, runner.channels, 512, 512), np.float32))
            import highdicom  # noqa: F401
            self.log("ready", f"worker on {runner.name}", device=runner.device)
            while not self.stop.is_set():
                try:
                    job = self.jobs.get(timeout=0.05)
                except queue.Empty:
                    try:
                        self._presegment(runner)
                    except Exception as exc:  # best effort: the series is segmented in full when complete
                        self.log("note", f"segmenting ahead skipped: {str(exc)[:200]}")
                        self.stop.wait(0.5)
                    continue
                try:
                    self._process(runner, job)
                except Exception as exc:  # one bad series must not stop the node
                    self._fail(job, f"{type(exc).__name__}: {str(exc)[:300]}")
                finally:
                    self.queued.discard(job.name)

    def _presegment(self, runner: Any) -> None:
        """While the worker is idle, segment instances of series that are still arriving, so that
        a completed series needs little more than its SEG (the model is 2D: slices are independent)."""
        import pydicom

        from .series import decode_hu

        if self.mask_bytes >= PRESEGMENT_CACHE_BYTES:
            self.stop.wait(0.1)
            return
        for series in sorted(self.dirs["incoming"].iterdir()):
            todo = []
            for f in sorted(series.glob("*.dcm")):
                key = _instance_key(f)
                if key is not None and key not in self.masks:
                    todo.append((f, key))
                if len(todo) == PRESEGMENT_BATCH:
                    break
            if not todo:
                continue
            slices, keys = [], []
            for f, key in todo:
                try:
                    ds = pydicom.dcmread(str(f))
                except OSError:
                    continue  # its folder moved to processing/ meanwhile: the worker takes it from there
                if str(getattr(ds, "SOPClassUID", "")) != CT_IMAGE_STORAGE:
                    continue
                hu = decode_hu(ds, f)
                if slices and hu.shape != slices[0].shape:
                    break
                slices.append(hu)
                keys.append(key)
            if not slices:
                continue
            masks = segment_volume(runner, np.stack(slices), batch=PRESEGMENT_BATCH)
            for key, m in zip(keys, masks):
                self.masks[key] = m
                self.mask_bytes += m.nbytes
            return
        self.stop.wait(0.05)

    def _take_masks(self, ordered: list[Any], runner: Any) -> tuple[Any, int]:
        """Masks for ``ordered`` instances: computed ahead where possible, the rest now.
        Returns (masks uint8 [N, H, W], how many were computed ahead)."""
        import pydicom

        from .series import decode_hu

        masks: list[Any] = []
        for inst in ordered:
            key = _instance_key(inst.path)
            m = self.masks.pop(key, None) if key is not None else None
            if m is not None:
                self.mask_bytes -= m.nbytes
            masks.append(m)
        ahead = sum(m is not None for m in masks)
        missing = [i for i, m in enumerate(masks) if m is None]
        for s in range(0, len(missing), PRESEGMENT_BATCH):
            part = missing[s:s + PRESEGMENT_BATCH]
            hu = np.stack([decode_hu(pydicom.dcmread(str(ordered[i].path)), ordered[i].path) for i in part])
            for i, m in zip(part, segment_volume(runner, hu, batch=PRESEGMENT_BATCH)):
                masks[i] = m
        return np.stack(masks), ahead

    def _process(self, runner: Any, job: Path) -> None:
        from .files import model_sha256, seg_name
        from .seg import build_seg, write_seg

        marker = job / ".seg-written"
        if marker.exists():  # killed after writing the SEG: only the bookkeeping is left
            seg_path = Path(marker.read_text().strip())
        else:
            import pydicom

            from .series import has_pixel_data

            t0 = time.perf_counter()
            instances = []
            headers: dict[Path, Any] = {}
            for f in sorted(job.glob("*.dcm")):
                ds = pydicom.dcmread(str(f), defer_size=1024)  # one read per file; pixels stay on disk
                inst = header_of(ds, f, has_pixel_data(ds))
                if unusable_reason(inst) is None:
                    instances.append(inst)
                    headers[f] = ds
            if not instances:
                raise InputError("no usable CT instances")
            by_series: dict[str, list[Any]] = {}
            for inst in instances:
                by_series.setdefault(inst.series_uid, []).append(inst)
            (uid, insts), = by_series.items()
            ordered = order_slices(insts)
            datasets = [headers[i.path] for i in ordered]
            t1 = time.perf_counter()
            masks, ahead = self._take_masks(ordered, runner)
            t_seg = time.perf_counter() - t1
            seg = build_seg(datasets, masks, model_sha256=model_sha256(self.bundle, self.precision),
                            num_classes=self.bundle.out_channels, label=self.segment_label)
            name = seg_name(uid)
            if job.name != _safe_uid(uid):
                name = name.replace(".dcm", f"_{job.name.rsplit('.', 1)[-1]}.dcm")
            seg_path = self.dirs["seg"] / name
            write_seg(seg, seg_path)
            if self.forward is not None:
                with atomic_path(self.dirs["outbox"] / name) as tmp:
                    shutil.copyfile(seg_path, tmp)
            with atomic_path(marker) as tmp:
                tmp.write_text(str(seg_path))
            self.log("written", f"SEG of series {uid}: {len(ordered)} slices, {int(seg.NumberOfFrames)} frame(s) "
                     f"with mask, {time.perf_counter() - t0:.2f} s", series=uid, seg=str(seg_path),
                     slices=len(ordered), frames=int(seg.NumberOfFrames), seconds=round(time.perf_counter() - t0, 4),
                     segment_seconds=round(t_seg, 4), segmented_ahead=ahead)
        self._move(job, self.dirs["archive"])

    def _fail(self, job: Path, reason: str) -> None:
        self.log("failed", f"series {job.name} not segmented: {reason}", series=job.name)
        for f in job.glob("*.dcm"):
            m = self.masks.pop(_instance_key(f), None)  # type: ignore[arg-type]
            if m is not None:
                self.mask_bytes -= m.nbytes
        with contextlib.suppress(OSError):
            (job / "failed.txt").write_text(reason + "\n")
        self._move(job, self.dirs["failed"])

    @staticmethod
    def _move(src: Path, parent: Path) -> None:
        dst = parent / src.name
        n = 1
        while dst.exists():
            n += 1
            dst = parent / f"{src.name}.{n}"
        os.replace(src, dst)

    # ------------------------------------------------------------------ forwarder
    def _forwarder(self) -> None:
        delay = 0.0
        next_try = 0.0
        while not self.stop.is_set():
            pending = sorted(self.dirs["outbox"].glob("*.dcm"), key=lambda p: p.stat().st_mtime)
            if not pending or time.monotonic() < next_try:
                self.stop.wait(0.2)
                continue
            f = pending[0]
            ok, why = self._send(f)
            if ok:
                os.replace(f, self.dirs["sent"] / f.name)
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

    # ------------------------------------------------------------------ run
    def serve(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0)."""
        from pynetdicom import evt

        from ..runtimes.base import load_runner

        runner = load_runner(self.bundle, backend=self.backend, precision=self.precision, **self.runner_options)
        runner.activate()  # a backend that cannot run here fails now, before the port is opened
        self._recover()
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected)]
        ae = self._ae()
        try:
            server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}") from None
        threads = [threading.Thread(target=self._worker, args=(runner,), name="attdeploy-worker", daemon=True)]
        if self.forward is not None:
            threads.append(threading.Thread(target=self._forwarder, name="attdeploy-forwarder", daemon=True))
        for t in threads:
            t.start()
        old = {s: signal.signal(s, lambda *_: self.stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log("listening", f"{self.ae_title} on {self.bind}:{self.port}", pid=os.getpid(),
                 out=str(self.out), forward=str(self.forward) if self.forward else None,
                 allow_ae=",".join(self.allow_ae) or "any")
        try:
            while not self.stop.is_set():
                self._seal_quiet_series()
                self.stop.wait(0.1)
        finally:
            server.shutdown()  # no new associations; the worker finishes its series or leaves it queued
            for t in threads:
                t.join(timeout=120)
            for s, h in old.items():
                signal.signal(s, h)
            self.log("stopped", "node stopped; unfinished work is picked up on the next start")
        return 0


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes always; compressed ones where pydicom has a working decoder."""
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    out = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return out
    for uid in (RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
                JPEG2000):
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except Exception:
            continue
    return out
