"""The node's spool on disk: series folders moving from incoming/ through processing/ to
archive/ or failed/, the quiet-period scheduler, recovery after a restart, pruning, SEG state.

:class:`Spool` owns all of it: the folders, which series are being written and when each last
received an instance, and the queue of sealed series. The SCP handlers store into it, the worker
takes jobs from it, the forwarder drains its outbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attunet_deploy.apps.dicom.checks import is_valid_uid
from attunet_deploy.apps.dicom.config import NodeLimits, NodeLog
from attunet_deploy.apps.dicom.monitor import NodeMetrics
from attunet_deploy.fileio import atomic_path, fsync_dir

#: Separates a series UID from a batch number in spool folder names (never part of a valid UID).
BATCH_SEP = "~"
#: The spool's folders under --out (node.py's docstring says what each holds).
FOLDERS = ("tmp", "incoming", "processing", "seg", "outbox", "sent", "archive", "failed", "state")


def instance_key(path: Path) -> tuple[str, int, int] | None:
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


@dataclass(frozen=True)
class SegState:
    """The SEG series written for one source series, and the InstanceNumber of its last SEG."""

    seg_series_uid: str
    number: int


class Spool:
    """Series folders on disk and the scheduler that seals quiet series into jobs."""

    def __init__(self, out: Path, quiet: float, limits: NodeLimits, log: NodeLog, metrics: NodeMetrics) -> None:
        self.out, self.quiet, self.limits, self.log, self.metrics = out, quiet, limits, log, metrics
        self.dirs = {name: out / name for name in FOLDERS}
        self.lock = threading.Lock()
        #: associations writing each series right now, and when each series last received an instance
        self.writers: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.jobs: queue.Queue[Path] = queue.Queue()
        self.queued: set[str] = set()

    # ------------------------------------------------------------------ receiving
    @contextlib.contextmanager
    def writing(self, series: str) -> Iterator[Path]:
        """While an instance of ``series`` is moved into incoming/: the folder it goes to. The series
        cannot be sealed meanwhile, and its quiet period restarts afterwards."""
        with self.lock:
            self.writers[series] = self.writers.get(series, 0) + 1
        try:
            yield self.dirs["incoming"] / series
        finally:
            with self.lock:
                self.writers[series] -= 1
                self.last_seen[series] = time.monotonic()

    def arriving(self) -> list[Path]:
        """Series folders still receiving instances."""
        try:
            return sorted(p for p in self.dirs["incoming"].iterdir() if p.is_dir())
        except OSError:
            return []

    # ------------------------------------------------------------------ scheduling
    def recover(self) -> None:
        """Pick up what a previous run left: queued series, unfinished incoming series."""
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for f in self.dirs["tmp"].iterdir():  # half-received instances were never acknowledged
            with contextlib.suppress(OSError):
                f.unlink()
        for job in sorted(self.dirs["processing"].iterdir()):
            if job.is_dir():
                self.queue(job)
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

    def queue(self, job: Path) -> None:
        if job.name not in self.queued:
            self.queued.add(job.name)
            self.jobs.put(job)

    def done(self, job: Path) -> None:
        self.queued.discard(job.name)

    def unfinished(self) -> int:
        """Series received or queued but not yet segmented (what a stop leaves for the next start)."""
        return len(self.queued) + len(self.arriving())

    def seal_quiet_series(self) -> None:
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
        self.queue(dst)

    def prune(self) -> None:
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

    # ------------------------------------------------------------------ SEG series state
    def seg_state(self, series: str) -> SegState:
        """The SEG series of a source series (stable across batches and restarts) and its last number."""
        import highdicom as hd

        path = self.dirs["state"] / f"{series}.json"
        try:
            state = json.loads(path.read_text())
            if is_valid_uid(state.get("seg_series_uid")) and isinstance(state.get("number"), int):
                return SegState(str(state["seg_series_uid"]), int(state["number"]))
        except (OSError, ValueError, AttributeError):
            pass
        return SegState(str(hd.UID()), 0)

    def save_seg_state(self, series: str, state: SegState) -> None:
        with atomic_path(self.dirs["state"] / f"{series}.json") as tmp:
            tmp.write_text(json.dumps({"seg_series_uid": state.seg_series_uid, "number": state.number}))

    # ------------------------------------------------------------------ where a job ends
    def archive(self, job: Path, archive: Path) -> None:
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

    def leave_out(self, series: str, f: Path, reason: str) -> None:
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

    def fail(self, job: Path, reason: str) -> None:
        self.log("failed", f"series {series_of(job)} not segmented: {reason}", series=series_of(job))
        self.metrics.count("failed")
        with contextlib.suppress(OSError):
            (job / "failed.txt").write_text(reason + "\n")
        with contextlib.suppress(OSError):
            _move(job, self.dirs["failed"])


def _move(src: Path, parent: Path) -> None:
    dst = parent / src.name
    n = 1
    while dst.exists():
        n += 1
        dst = parent / f"{src.name}.{n}"
    os.replace(src, dst)
