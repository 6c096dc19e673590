"""``attdeploy serve-dicom``: a Storage SCP that turns CT series into DICOM SEG.

Folders under ``--out`` hold the node's state on disk, so a restart (even after ``kill -9``)
loses nothing that was acknowledged. Every name below comes from a UID that was validated on
receipt (digits and dots, at most 64 characters), so no two UIDs share a name and none is ``..``:

- ``tmp/``                   instances being received (streamed to disk, never held in memory)
- ``incoming/<series>/``     instances checked and written (fsync + rename) *before* Success is returned
- ``processing/<series>~<n>/`` a series quiet for ``--quiet-seconds``, queued for the worker
- ``seg/``                   the DICOM SEGs written, ``SEG_<series>_<k>.dcm`` (k = the SEG's InstanceNumber)
- ``outbox/``                SEGs waiting to be forwarded (``--forward``), retried with back-off
- ``sent/``                  forwarded SEGs (pruned by ``--keep-archive``)
- ``archive/<series>/``      instances of segmented series (pruned by ``--keep-archive``); instances that
                             arrive after a series' SEG are segmented together with these, and the new
                             SEG supersedes the old one (same SEG series, next InstanceNumber)
- ``failed/<series>~<n>/``   series or instances that could not be segmented, with ``failed.txt``
- ``state/<series>.json``    the SEG series UID and the last SEG InstanceNumber of each source series

DICOM has no "series complete" message: a series counts as complete when no instance of it
arrived for ``--quiet-seconds`` (MONAI Deploy's gateway waits 5 s, Orthanc's StableAge 60 s).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits as _limits
from ..bundle import Bundle
from ..errors import InputError
from ..fileio import atomic_path, fsync_dir
from .access import parse_hosts, server_class, tls_context
from .checks import is_valid_uid, pixel_problem, uid_problem
from .monitor import NodeMetrics, start_http
from .series import (
    CT_IMAGE_STORAGE,
    dedupe_series,
    geometry_problem,
    header_of,
    order_slices,
    segment_volume,
    unusable_reason,
)

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
#: Separates a series UID from a batch number in spool folder names (never part of a valid UID).
BATCH_SEP = "~"
#: An instance streaming in past this multiple of --max-instance-mb aborts its association.
STREAM_CEILING = 4
#: Set to "worker" to make the worker thread die on its next job (tests of /healthz only).
FAULT_ENV = "ATTDEPLOY_NODE_FAULT"


@dataclass
class NodeLimits:
    """Resource bounds of the node (every one a CLI option; README "At the scanner")."""

    max_instance_mb: float = 64.0
    min_free_mb: float = 1024.0
    keep_archive_days: float | None = 7.0  # None: delete a series' instances once its SEG is written
    max_associations: int = 32
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0

    def check(self) -> NodeLimits:
        for name in ("max_instance_mb", "min_free_mb", "acse_timeout", "dimse_timeout", "network_timeout"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0 or (v == 0 and name != "min_free_mb"):
                raise InputError(f"--{name.replace('_', '-')} {v:g}: must be a positive number")
        if self.keep_archive_days is not None and not (math.isfinite(self.keep_archive_days)
                                                       and self.keep_archive_days > 0):
            raise InputError(f"--keep-archive {self.keep_archive_days:g}: use 'none' or a number of days > 0")
        if not 1 <= self.max_associations <= 1024:
            raise InputError(f"--max-associations {self.max_associations}: must be in 1..1024")
        return self


def parse_keep(text: str) -> float | None:
    """``--keep-archive``: ``none`` or a number of days."""
    if text.strip().lower() == "none":
        return None
    try:
        days = float(text)
    except ValueError:
        raise InputError(f"--keep-archive {text!r}: use 'none' or a number of days, e.g. 7") from None
    if not math.isfinite(days) or days <= 0:
        raise InputError(f"--keep-archive {text!r}: use 'none' or a number of days > 0")
    return days


def _instance_key(path: Path) -> tuple[str, int, int] | None:
    """Identity of a received instance file that survives the move of its folder (a resend of the
    same SOP instance changes size or mtime, so its old mask is not reused)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return path.name, st.st_size, st.st_mtime_ns


def series_of(job: Path) -> str:
    """The source series UID of a spool folder (``<series>`` or ``<series>~<n>``)."""
    return job.name.split(BATCH_SEP, 1)[0]


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
    return title.strip(" ")


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


class Refused(Exception):
    """A C-STORE answered with a failure status (the status and the reason for the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class DicomNode:
    """The Storage SCP, the quiet-period scheduler, one segmentation worker and the forwarder."""

    def __init__(self, bundle: Bundle, out: str | os.PathLike[str], *, port: int = 11112,
                 ae_title: str = "ATTDEPLOY", bind: str = "0.0.0.0", allow_ae: list[str] | None = None,
                 quiet_seconds: float = 5.0, forward: str | None = None, log_json: bool = False,
                 backend: str = "auto", precision: str = "fp32", segment_label: str = "Target",
                 runner_options: dict[str, Any] | None = None, limits: NodeLimits | None = None,
                 any_called_ae: bool = False, allow_host: list[str] | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None, http_port: int | None = None) -> None:
        if not 0 < port < 65536:
            raise InputError(f"--port {port}: must be in 1..65535")
        if http_port is not None and not 0 < http_port < 65536:
            raise InputError(f"--http-port {http_port}: must be in 1..65535")
        if not 0.1 <= quiet_seconds <= 3600:
            raise InputError(f"--quiet-seconds {quiet_seconds}: must be in 0.1..3600")
        self.bundle = bundle
        self.out = Path(out)
        self.port = port
        self.http_port = http_port
        self.ae_title = check_ae_title(ae_title)
        self.bind = bind
        self.allow_ae = [check_ae_title(a, "--allow-ae") for a in (allow_ae or [])]
        self.any_called_ae = any_called_ae
        self.allow_host = parse_hosts(list(allow_host or []))
        self.ssl_context = tls_context(tls_cert, tls_key, tls_ca)
        self.limits = (limits or NodeLimits()).check()
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
        #: bytes received on each association since its last C-STORE (bounds a streamed instance)
        self.received_bytes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.threads: dict[str, threading.Thread] = {}
        self.dirs = {name: self.out / name for name in ("tmp", "incoming", "processing", "seg", "outbox", "sent",
                                                          "archive", "failed", "state")}
        self.metrics = NodeMetrics(self.out, self.dirs["outbox"])

    # ------------------------------------------------------------------ storage SCP
    def _handle_store(self, event: Any) -> int:
        calling = str(getattr(event.assoc.requestor, "ae_title", "?")).strip()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        self.received_bytes[event.assoc] = 0
        try:
            inst, target = self._store(event)
        except Refused as exc:
            code = f"0x{exc.status:04X}"
            self.metrics.count("refused", status=code)
            self.log("refused", str(exc), sop_instance=sop_uid[:80], calling_ae=calling, status=code)
            return exc.status
        except Exception as exc:  # a bug must cost one instance a failure status, never the node
            self.metrics.count("refused", status="0xC000")
            self.log("refused", f"unexpected {type(exc).__name__}: {str(exc)[:160]}", sop_instance=sop_uid[:80],
                     calling_ae=calling, status="0xC000")
            return CANNOT_UNDERSTAND
        self.metrics.count("received")
        self.log("received", f"CT instance {inst.instance_number or '?'} of series {inst.series_uid}",
                 sop_instance=sop_uid, calling_ae=calling, path=str(target))
        return SUCCESS

    def _store(self, event: Any) -> tuple[Any, Path]:
        """Check one C-STORE and write its instance into incoming/; Refused(status) otherwise."""
        import pydicom

        from .series import has_pixel_data

        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        src = Path(event.dataset_path)  # streamed to tmp/ by pynetdicom (STORE_RECV_CHUNKED_DATASET)
        size = src.stat().st_size
        if size > self.limits.max_instance_mb * 2**20:
            raise Refused(OUT_OF_RESOURCES, f"instance of {size / 2**20:,.1f} MB is above --max-instance-mb "
                                            f"{self.limits.max_instance_mb:g}")
        free = shutil.disk_usage(self.out).free
        if free < self.limits.min_free_mb * 2**20 + size:
            raise Refused(OUT_OF_RESOURCES, f"{free / 2**20:,.0f} MB free under {self.out}, below --min-free-mb "
                                            f"{self.limits.min_free_mb:g}")
        if sop_class != CT_IMAGE_STORAGE:
            raise Refused(SOP_CLASS_NOT_SUPPORTED, f"only CT Image Storage is segmented (got {sop_class[:70]})")
        if not is_valid_uid(sop_uid):
            raise Refused(CANNOT_UNDERSTAND, f"Affected SOP Instance UID {sop_uid[:80]!r} is not a valid DICOM UID")
        try:
            ds = pydicom.dcmread(str(src))
            transfer_syntax = ds.file_meta.TransferSyntaxUID
        except Exception as exc:
            raise Refused(CANNOT_UNDERSTAND, f"cannot decode the dataset: {str(exc)[:120]}") from None
        problem = uid_problem(ds, sop_class, sop_uid)
        if problem:
            raise Refused(*problem)
        inst = header_of(ds, src, has_pixel_data(ds))
        reason = unusable_reason(inst) or geometry_problem(inst) or \
            pixel_problem(ds, transfer_syntax, _limits.IMAGE_PIXELS.bytes())
        if reason:
            raise Refused(CANNOT_UNDERSTAND, reason)
        series = inst.series_uid
        with self.lock:
            self.writers[series] = self.writers.get(series, 0) + 1
        try:
            target = self.dirs["incoming"] / series / f"{sop_uid}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(src, 0o644)
            os.replace(src, target)  # a resend of the same SOP instance replaces it
            fsync_dir(target.parent)
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror or exc}") from None
        finally:
            with self.lock:
                self.writers[series] -= 1
                self.last_seen[series] = time.monotonic()
        return inst, target

    def _handle_data(self, event: Any) -> None:
        """Bound an instance while it streams in: past STREAM_CEILING x --max-instance-mb, or when the
        disk under --out falls below half of --min-free-mb, the association is aborted. Between the
        limit and the ceiling the instance is received (on disk, not in memory) and refused with
        0xA700, so the sender is told why."""
        before = self.received_bytes.get(event.assoc, 0)
        n = before + len(event.data)
        self.received_bytes[event.assoc] = n
        if before >> 24 == n >> 24:  # checked once per 16 MiB received
            return
        why = None
        if n > STREAM_CEILING * self.limits.max_instance_mb * 2**20:
            why = f"more than {STREAM_CEILING} x --max-instance-mb {self.limits.max_instance_mb:g} for one instance"
        elif shutil.disk_usage(self.out).free < self.limits.min_free_mb * 2**19:
            why = f"the disk under {self.out} fell below half of --min-free-mb {self.limits.min_free_mb:g}"
        if why:
            self.log("aborted", f"association aborted: {why}", calling_ae=str(event.assoc.requestor.ae_title).strip())
            self.metrics.count("refused", status="abort")
            event.assoc.abort()

    def _handle_closed(self, event: Any) -> None:
        """An association that ended mid-instance (aborted, dropped) leaves pynetdicom's partial file
        in tmp/: it was never acknowledged, so it goes."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.close()
                os.unlink(partial.name)

    def _handle_rejected(self, event: Any) -> None:
        self.log("rejected", "association refused", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                 address=event.assoc.requestor.address)

    def _ae(self) -> Any:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        # Negotiation offers only what the node processes: CT Image Storage in the transfer syntaxes it
        # can decode, and Verification. Anything else is refused at association time.
        ae.add_supported_context(CT_IMAGE_STORAGE, accepted_transfer_syntaxes())
        ae.add_supported_context(Verification)
        ae.require_called_aet = not self.any_called_ae
        if self.allow_ae:
            ae.require_calling_aet = self.allow_ae
        ae.maximum_associations = self.limits.max_associations
        ae.acse_timeout = self.limits.acse_timeout  # also ARTIM: a silent socket is dropped after this
        ae.dimse_timeout = self.limits.dimse_timeout
        ae.network_timeout = self.limits.network_timeout
        return ae

    # ------------------------------------------------------------------ scheduling
    def _recover(self) -> None:
        """Pick up what a previous run left: queued series, unfinished incoming series."""
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for f in self.dirs["tmp"].iterdir():  # half-received instances were never acknowledged
            with contextlib.suppress(OSError):
                f.unlink()
        for job in sorted(self.dirs["processing"].iterdir()):
            if job.is_dir():
                self._queue(job)
                self.log("recovered", f"series {series_of(job)} queued again after a restart", series=series_of(job))
        now = time.monotonic()
        for series in sorted(self.dirs["incoming"].iterdir()):
            if series.is_dir():
                # A full quiet period from the restart: a scanner resending the series after the node
                # came back must land in the same batch, not after a partial SEG.
                self.last_seen[series.name] = now
                self.log("recovered", f"series {series.name} waits {self.quiet:g} s for more instances",
                         series=series.name)
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
                del self.last_seen[series]
                try:
                    self._seal(series)
                except Exception as exc:  # one series must never stop the scheduler
                    self.log("error", f"series {series} not queued: {type(exc).__name__}: {str(exc)[:200]}",
                             series=series)

    def _seal(self, series: str) -> None:
        src = self.dirs["incoming"] / series
        if not is_valid_uid(series) or not src.is_dir():
            return
        dst = self.dirs["processing"] / f"{series}{BATCH_SEP}{time.time_ns()}"
        os.replace(src, dst)
        fsync_dir(self.dirs["processing"])
        count = sum(1 for _ in dst.glob("*.dcm"))
        self.log("complete", f"series {series}: {count} instance(s), quiet for {self.quiet:g} s",
                 series=series, instances=count)
        self._queue(dst)

    def _prune(self) -> None:
        """--keep-archive DAYS: archive/ and sent/ entries older than that go; state files follow."""
        days = self.limits.keep_archive_days
        cutoff = time.time() - (days if days is not None else 0.0) * 86400
        for d in ("archive", "sent"):
            for entry in self.dirs[d].iterdir():
                try:
                    if entry.stat().st_mtime >= cutoff:
                        continue
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                except OSError:
                    continue
        stale = time.time() - 2 * (self.limits.network_timeout + self.limits.dimse_timeout)
        for entry in self.dirs["tmp"].iterdir():  # no byte for that long: its association is gone
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < stale:
                    entry.unlink()
        state_cutoff = time.time() - max(days or 0.0, 1.0) * 86400
        for entry in self.dirs["state"].glob("*.json"):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < state_cutoff and not (self.dirs["archive"] / entry.stem).exists():
                    entry.unlink()

    # ------------------------------------------------------------------ worker
    def _worker(self, runner: Any) -> None:
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
                if os.environ.get(FAULT_ENV) == "worker":
                    raise RuntimeError(f"{FAULT_ENV}=worker: the worker thread dies here (a test of /healthz)")
                try:
                    self._process(runner, job)
                except Exception as exc:  # one bad series must not stop the node
                    self._fail(job, f"{type(exc).__name__}: {str(exc)[:300]}")
                finally:
                    self.queued.discard(job.name)

    def _run_worker(self, runner: Any) -> None:
        try:
            self._worker(runner)
        except BaseException as exc:
            self.log("error", f"the worker thread stopped: {type(exc).__name__}: {str(exc)[:200]}")
            raise

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
                    hu = decode_hu(ds, f)
                except (OSError, InputError):
                    continue  # moved to processing/ meanwhile, or undecodable: the worker handles it there
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

    def _take_masks(self, ordered: list[Any], runner: Any) -> tuple[list[Any], list[tuple[Any, str]], int]:
        """Masks for ``ordered`` instances: computed ahead where possible, the rest now.

        Returns (masks uint8 [H, W] per usable instance, [(instance, reason)] left out because their
        pixels do not decode, how many masks were computed ahead)."""
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
        bad: dict[int, str] = {}
        missing = [i for i, m in enumerate(masks) if m is None]
        for s in range(0, len(missing), PRESEGMENT_BATCH):
            part, slices = [], []
            for i in missing[s:s + PRESEGMENT_BATCH]:
                try:
                    slices.append(decode_hu(pydicom.dcmread(str(ordered[i].path)), ordered[i].path.name))
                    part.append(i)
                except Exception as exc:
                    bad[i] = str(exc)[:200]
            if part:
                for i, m in zip(part, segment_volume(runner, np.stack(slices), batch=PRESEGMENT_BATCH)):
                    masks[i] = m
        left_out = [(ordered[i], bad[i]) for i in sorted(bad)]
        return [m for i, m in enumerate(masks) if i not in bad], left_out, ahead

    def _state(self, series: str) -> dict[str, Any]:
        """The SEG series of a source series (stable across batches and restarts) and its last number."""
        import highdicom as hd

        path = self.dirs["state"] / f"{series}.json"
        try:
            state = json.loads(path.read_text())
            if is_valid_uid(state.get("seg_series_uid")) and isinstance(state.get("number"), int):
                return state
        except (OSError, ValueError, AttributeError):
            pass
        return {"seg_series_uid": str(hd.UID()), "number": 0}

    def _save_state(self, series: str, state: dict[str, Any]) -> None:
        with atomic_path(self.dirs["state"] / f"{series}.json") as tmp:
            tmp.write_text(json.dumps(state))

    def _process(self, runner: Any, job: Path) -> None:
        from .files import model_sha256
        from .seg import build_seg, write_seg

        series = series_of(job)
        if not is_valid_uid(series):
            raise InputError(f"spool folder {job.name} is not named after a series UID")
        archive = self.dirs["archive"] / series
        marker = job / ".seg-written"
        if not marker.exists():
            import pydicom

            from .series import has_pixel_data

            t0 = time.perf_counter()
            # A series that already has a SEG: its earlier instances join the new ones, so the new SEG
            # covers the whole series and supersedes the old one.
            files = {f.name: f for f in sorted(archive.glob("*.dcm"))} if archive.is_dir() else {}
            earlier = len(files)
            files.update({f.name: f for f in sorted(job.glob("*.dcm"))})
            instances, headers, left_out = [], {}, []
            for f in files.values():
                try:
                    ds = pydicom.dcmread(str(f), defer_size=1024)  # one read per file; pixels stay on disk
                    inst = header_of(ds, f, has_pixel_data(ds))
                    reason = unusable_reason(inst)
                    if reason is None and inst.series_uid != series:
                        reason = f"belongs to series {inst.series_uid}, not {series}"
                except Exception as exc:
                    inst, reason = None, f"unreadable: {str(exc)[:160]}"
                if reason is None:
                    instances.append(inst)
                    headers[f] = ds
                else:
                    left_out.append((f, reason))
            if not instances:
                raise InputError("no usable CT instances")
            kept, _ = dedupe_series(instances)  # one file per SOP instance here: refuses position clashes
            ordered = order_slices(kept)
            t1 = time.perf_counter()
            masks, bad, ahead = self._take_masks(ordered, runner)
            t_seg = time.perf_counter() - t1
            left_out += [(inst.path, reason) for inst, reason in bad]
            bad_paths = {inst.path for inst, _ in bad}
            ordered = [i for i in ordered if i.path not in bad_paths]
            for f, reason in left_out:
                self._leave_out(series, f, reason)
            if not ordered:
                raise InputError("no instance of the series could be decoded")
            state = self._state(series)
            number = int(state["number"]) + 1
            seg = build_seg([headers[i.path] for i in ordered], np.stack(masks),
                            model_sha256=model_sha256(self.bundle, self.precision),
                            num_classes=self.bundle.out_channels, label=self.segment_label,
                            series_instance_uid=state["seg_series_uid"], instance_number=number)
            name = f"SEG_{series}_{number}.dcm"
            seg_path = self.dirs["seg"] / name
            k = 1
            while seg_path.exists():  # local copies are never overwritten
                k += 1
                seg_path = self.dirs["seg"] / f"SEG_{series}_{number}-{k}.dcm"
            write_seg(seg, seg_path)
            if self.forward is not None:
                with atomic_path(self.dirs["outbox"] / seg_path.name) as tmp:
                    shutil.copyfile(seg_path, tmp)
            with atomic_path(marker) as tmp:
                tmp.write_text(json.dumps({"seg": str(seg_path), "number": number,
                                           "seg_series_uid": state["seg_series_uid"]}))
            self.metrics.count("segs_written")
            self.metrics.count("segmented")
            self.metrics.observe_inference(t_seg)
            self.log("written", f"SEG of series {series}: {len(ordered)} slices, {int(seg.NumberOfFrames)} frame(s) "
                     f"with mask, {time.perf_counter() - t0:.2f} s", series=series, seg=str(seg_path),
                     slices=len(ordered), frames=int(seg.NumberOfFrames), seconds=round(time.perf_counter() - t0, 4),
                     segment_seconds=round(t_seg, 4), segmented_ahead=ahead, seg_instance_number=number,
                     supersedes=number - 1 if number > 1 else None, earlier_instances=earlier)
        done = json.loads(marker.read_text())
        state = self._state(series)
        if int(state["number"]) < int(done["number"]):
            self._save_state(series, {"seg_series_uid": done["seg_series_uid"], "number": int(done["number"])})
        self._archive(job, archive)

    def _archive(self, job: Path, archive: Path) -> None:
        """Move a processed batch's instances into archive/<series>/ (or drop them: --keep-archive none)."""
        if self.limits.keep_archive_days is None:
            shutil.rmtree(archive, ignore_errors=True)
            shutil.rmtree(job, ignore_errors=True)
            return
        archive.mkdir(parents=True, exist_ok=True)
        for f in job.glob("*.dcm"):
            os.replace(f, archive / f.name)
        fsync_dir(archive)
        os.utime(archive)
        shutil.rmtree(job, ignore_errors=True)

    def _leave_out(self, series: str, f: Path, reason: str) -> None:
        """One stored instance that cannot be segmented goes to failed/<series>~left-out/, with its reason."""
        dst_dir = self.dirs["failed"] / f"{series}{BATCH_SEP}left-out"
        dst_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.replace(f, dst_dir / f.name)
            with open(dst_dir / "failed.txt", "a") as fh:
                fh.write(f"{f.name}: {reason}\n")
        self.metrics.count("left_out")
        self.log("left-out", f"instance {f.stem} of series {series} left out of the SEG: {reason}", series=series,
                 sop_instance=f.stem)

    def _fail(self, job: Path, reason: str) -> None:
        self.log("failed", f"series {series_of(job)} not segmented: {reason}", series=series_of(job))
        self.metrics.count("failed")
        for f in job.glob("*.dcm"):
            m = self.masks.pop(_instance_key(f), None)  # type: ignore[arg-type]
            if m is not None:
                self.mask_bytes -= m.nbytes
        with contextlib.suppress(OSError):
            (job / "failed.txt").write_text(reason + "\n")
        with contextlib.suppress(OSError):
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

    # ------------------------------------------------------------------ run
    def healthy(self) -> tuple[bool, str]:
        """(ok, why) for /healthz: the SCP accepts and every thread of the node is alive."""
        if self.stop.is_set():
            return False, "stopping"
        dead = [name for name, t in self.threads.items() if not t.is_alive()]
        if dead:
            return False, "dead: " + ", ".join(dead)
        return True, "ok"

    def serve(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0)."""
        from pynetdicom import _config, evt

        from ..runtimes.base import load_runner

        runner = load_runner(self.bundle, backend=self.backend, precision=self.precision, **self.runner_options)
        runner.activate()  # a backend that cannot run here fails now, before the port is opened
        self._recover()
        # Instances stream to disk under --out while they arrive (never whole in memory), and are then
        # renamed into incoming/ on the same filesystem. This process serves only the node.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.dirs["tmp"])
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected),
                    (evt.EVT_DATA_RECV, self._handle_data), (evt.EVT_CONN_CLOSE, self._handle_closed)]
        ae = self._ae()
        cls = server_class(self.allow_host, self.limits.acse_timeout, self.log)
        try:
            server = ae.make_server((self.bind, self.port), evt_handlers=handlers, ssl_context=self.ssl_context,
                                    server_class=cls)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}") from None
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it again
        http = None
        if self.http_port is not None:
            try:
                http = start_http(self.bind, self.http_port, self.metrics, self.healthy)
            except OSError as exc:
                server.server_close()
                raise InputError(f"cannot listen on {self.bind}:{self.http_port} (--http-port): "
                                 f"{exc.strerror or exc}") from None
        self.threads = {"scp": threading.Thread(target=server.serve_forever, name="attdeploy-scp", daemon=True),
                        "worker": threading.Thread(target=self._run_worker, args=(runner,), name="attdeploy-worker",
                                                   daemon=True)}
        if self.forward is not None:
            self.threads["forwarder"] = threading.Thread(target=self._forwarder, name="attdeploy-forwarder",
                                                         daemon=True)
        for t in self.threads.values():
            t.start()
        old = {s: signal.signal(s, lambda *_: self.stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log("listening", f"{self.ae_title} on {self.bind}:{self.port}", pid=os.getpid(),
                 out=str(self.out), forward=str(self.forward) if self.forward else None,
                 allow_ae=",".join(self.allow_ae) or "any", allow_host=",".join(map(str, self.allow_host)) or "any",
                 called_ae="any" if self.any_called_ae else self.ae_title, tls=self.ssl_context is not None,
                 http_port=self.http_port, max_associations=self.limits.max_associations,
                 max_instance_mb=self.limits.max_instance_mb, min_free_mb=self.limits.min_free_mb,
                 keep_archive="none" if self.limits.keep_archive_days is None else self.limits.keep_archive_days)
        next_prune = 0.0
        try:
            while not self.stop.is_set():
                try:
                    self._seal_quiet_series()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + 60
                        self._prune()
                except Exception as exc:  # the scheduler never dies of one bad entry
                    self.log("error", f"scheduler: {type(exc).__name__}: {str(exc)[:200]}")
                self.stop.wait(0.1)
        finally:
            self.stop.set()  # every thread's loop ends on it
            server.shutdown()  # no new associations; the worker finishes its series or leaves it queued
            if http is not None:
                http.shutdown()
            for name, t in self.threads.items():
                if name != "scp":
                    t.join(timeout=30)
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
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    out = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return out
    for uid in (RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                JPEG2000Lossless, JPEG2000):
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except Exception:
            continue
    return out
