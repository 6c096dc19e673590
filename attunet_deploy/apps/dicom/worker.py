"""The segmentation worker: one thread that takes complete series from the spool, passes each through
the acceptance gate, segments it (with what ``ahead.py`` did while it arrived), flags it by QA, and
writes its results (SEG, and as configured RTSTRUCT, overlay, SR) superseding earlier ones of the series.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.ahead import PRESEGMENT_BATCH, SliceWork, Taken
from attunet_deploy.apps.dicom.assess import assess_series, features, judge_series
from attunet_deploy.apps.dicom.checks import is_valid_uid
from attunet_deploy.apps.dicom.config import NodeLog
from attunet_deploy.apps.dicom.gate import Gate, Verdict
from attunet_deploy.apps.dicom.monitor import NodeMetrics
from attunet_deploy.apps.dicom.outputs import SeriesResult, voxel_mm3, write_outputs
from attunet_deploy.apps.dicom.seg import Provenance, SegNaming
from attunet_deploy.apps.dicom.spool import SegState, Spool, series_of
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import atomic_path
from attunet_deploy.io.dicom import Instance, decode_hu, dicom_header, has_pixel_data, header_of, read_dataset
from attunet_deploy.io.dicom_series import dedupe_series, order_slices, unusable_reason
from attunet_deploy.qa import QaResult
from attunet_deploy.runtimes.base import Runner

#: Set to "worker" to make the worker thread die on its next job (tests of /healthz only).
FAULT_ENV = "ATTDEPLOY_NODE_FAULT"
#: Result file-name prefixes, by output kind.
PREFIX = {"seg": "SEG", "rtstruct": "RTSTRUCT", "sc": "SC", "sr": "SR"}


@dataclass(frozen=True)
class SegOptions:
    """What the node's results are: the kinds written (seg, rtstruct, sc, sr), the segment label,
    who made them, and whether copies are queued for the forwarder."""

    provenance: Provenance
    outputs: tuple[str, ...] = ("seg",)
    segment_label: str | None = None
    forward: bool = False


class Worker:
    """Series in, results out: one thread over a spool, with a runner, the gate and the slice work."""

    def __init__(self, spool: Spool, runner: Runner, bundle: Bundle, options: SegOptions, gate: Gate,
                 stop: threading.Event) -> None:
        self.spool, self.runner, self.bundle, self.options, self.gate, self.stop = \
            spool, runner, bundle, options, gate, stop
        self.log: NodeLog = spool.log
        self.metrics: NodeMetrics = spool.metrics
        self.dirs = spool.dirs
        self.slices = SliceWork(spool, runner, bundle.spec.postprocessing, stop)
        self.naming = SegNaming.of(bundle, options.segment_label)

    def run(self) -> None:
        """The worker thread: logs why it stopped if it dies (/healthz then reports it dead)."""
        try:
            self._loop(self.runner)
        except BaseException as exc:
            self.log("error", f"the worker thread stopped: {type(exc).__name__}: {str(exc)[:200]}")
            raise

    # ------------------------------------------------------------------ worker
    def _loop(self, runner: Runner) -> None:
        with runner:
            # First-call costs now rather than on the first series: the backend's buffers for a batch of
            # 512x512 slices, and highdicom's import (about a second).
            volume = runner.spatial_dims == 3
            window = self.bundle.sliding_window.roi if self.bundle.sliding_window else ()
            runner.infer(np.zeros((1, runner.channels, *window) if volume
                                  else (PRESEGMENT_BATCH, runner.channels, 512, 512), np.float32))
            import highdicom  # noqa: F401
            self.log("ready", f"worker on {runner.name}" + (": 3D model, each series is segmented as one volume "
                                                            "when complete (no segmenting ahead; slices are decoded "
                                                            "while it arrives)" if volume else ""),
                     device=runner.device, outputs=",".join(self.options.outputs), accept=self.gate.described)
            while not self.stop.is_set():
                try:
                    job = self.spool.jobs.get(timeout=0.05)
                except queue.Empty:
                    try:
                        self.slices.ahead()
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
                    self.spool.done(job)

    def _fail(self, job: Path, reason: str) -> None:
        self.slices.drop(job)
        self.spool.fail(job, reason)

    def _process(self, runner: Runner, job: Path) -> None:
        series = series_of(job)
        if not is_valid_uid(series):
            raise InputError(f"spool folder {job.name} is not named after a series UID")
        archive = self.dirs["archive"] / series
        marker = job / ".seg-written"
        if not marker.exists():
            self._segment_batch(runner, job, series, archive, marker)
        done = json.loads(marker.read_text())
        if "refused" in done:  # not kept: only what is segmented is stored
            shutil.rmtree(job, ignore_errors=True)
            return
        if self.spool.seg_state(series).number < int(done["number"]):
            self.spool.save_seg_state(series, SegState(str(done["seg_series_uid"]), int(done["number"])))
        self.spool.archive(job, archive)

    def _read_batch(self, job: Path, series: str, archive: Path
                    ) -> tuple[list[Instance], dict[Path, Any], list[tuple[Path, str]], int]:
        """Headers of a batch plus the series' archived instances: (usable instances, their datasets,
        [(file, reason)] left out, how many came from earlier batches)."""
        # A series that already has a SEG: its earlier instances join the new ones, so the new SEG
        # covers the whole series and supersedes the old one.
        files = {f.name: f for f in sorted(archive.glob("*.dcm"))} if archive.is_dir() else {}
        earlier = len(files)
        files.update({f.name: f for f in sorted(job.glob("*.dcm"))})
        instances: list[Instance] = []
        headers: dict[Path, Any] = {}
        left_out: list[tuple[Path, str]] = []
        for f in files.values():
            try:
                ds = dicom_header(f)  # one read per file; pixels stay on disk
                inst = header_of(ds, f, has_pixel_data(ds))
                reason = unusable_reason(inst)
                if reason is None and inst.series_uid != series:
                    reason = f"belongs to series {inst.series_uid}, not {series}"
            except Exception as exc:
                inst, reason = None, f"unreadable: {str(exc)[:160]}"
            if reason is None and inst is not None:
                instances.append(inst)
                headers[f] = ds
            else:
                left_out.append((f, reason or "unusable"))
        return instances, headers, left_out, earlier

    def _segment_batch(self, runner: Runner, job: Path, series: str, archive: Path, marker: Path) -> None:
        """Segment one batch (with the series' earlier instances) and write its results; ``marker`` records
        them. A series the gate refuses is dropped with one event (and ``marker`` says so)."""
        t0 = time.perf_counter()
        instances, headers, left_out, earlier = self._read_batch(job, series, archive)
        if not instances:
            raise InputError("no usable CT instances")
        kept, _ = dedupe_series(instances)  # one file per SOP instance here: refuses position clashes
        ordered = order_slices(kept)
        verdict = judge_series(self.gate, self.bundle, ordered, headers[ordered[0].path])
        if not verdict.accepted:
            self._refuse(job, series, verdict, marker)
            return
        t1 = time.perf_counter()
        taken = self.slices.take(ordered)
        t_seg = time.perf_counter() - t1
        left_out += [(inst.path, reason) for inst, reason in taken.left_out]
        bad_paths = {inst.path for inst, _ in taken.left_out}
        ordered = [i for i in ordered if i.path not in bad_paths]
        for f, reason in left_out:
            self.spool.leave_out(series, f, reason)
        if not ordered:
            raise InputError("no instance of the series could be decoded")
        datasets = [headers[i.path] for i in ordered]
        qa = self._qa(ordered, datasets, taken)
        written, state = self._write(series, ordered, datasets, np.stack(taken.masks), qa)
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"written": {k: [str(p) for p in v] for k, v in written.items()},
                                       "number": state.number, "seg_series_uid": state.seg_series_uid}))
        self.metrics.count("segs_written", len(written.get("seg", [])))
        self.metrics.count("segmented")
        self.metrics.count("qa", status=qa.status)
        self.metrics.observe_inference(t_seg)
        frames = int(np.count_nonzero(np.stack(taken.masks).reshape(len(ordered), -1).any(axis=1)))
        self.log("written", f"results of series {series}: {len(ordered)} slices, {frames} with a segment, QA "
                 f"{qa.status}, {time.perf_counter() - t0:.2f} s", series=series,
                 seg=str(written["seg"][0]) if written.get("seg") else None,
                 outputs={k: len(v) for k, v in written.items()}, qa=qa.status, qa_reasons=list(qa.reasons),
                 slices=len(ordered), frames=frames, seconds=round(time.perf_counter() - t0, 4),
                 segment_seconds=round(t_seg, 4), segmented_ahead=taken.ahead if runner.spatial_dims == 2 else 0,
                 decoded_ahead=taken.ahead if runner.spatial_dims == 3 else None, seg_instance_number=state.number,
                 supersedes=state.number - 1 if state.number > 1 else None, earlier_instances=earlier)

    def _refuse(self, job: Path, series: str, verdict: Verdict, marker: Path) -> None:
        """A series the gate refuses: one event naming the rule, a counter, no results; not kept."""
        self.slices.drop(job)
        self.metrics.count("series_refused", rule=verdict.rule)
        self.log("refused-series", f"series {series} not segmented: {verdict.rule}: {verdict.reason}",
                 series=series, rule=verdict.rule, reason=verdict.reason, instances=sum(1 for _ in job.glob("*.dcm")))
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"refused": verdict.rule}))

    def _qa(self, ordered: list[Instance], datasets: list[Any], taken: Taken) -> QaResult:
        f = features(self.bundle, ordered, datasets[0], taken.percentiles)
        return assess_series(self.bundle, self.naming, f, np.stack(taken.masks), taken.tally)

    def _write(self, series: str, ordered: list[Instance], datasets: list[Any], masks: np.ndarray, qa: QaResult
               ) -> tuple[dict[str, list[Path]], SegState]:
        """The results of ``series`` (next InstanceNumber of its result series), in seg/ and queued in outbox/;
        the paths by kind and the state they were numbered in (saved later, with the marker)."""
        from attunet_deploy.apps.dicom.gate import series_z

        state = self.spool.seg_state(series)
        number = state.number + 1
        norm = self.bundle.spec.normalization
        window = (norm.level, norm.width) if norm.kind == "ct_window" else (40.0, 400.0)
        result = SeriesResult(datasets, masks, self.naming, self.options.provenance, qa,
                              voxel_mm3(datasets, series_z(ordered)), window)

        def target(kind: str, k: int) -> Path:
            base = f"{PREFIX[kind]}_{series}_{number}" + (f"_{k + 1:04d}" if kind == "sc" else "")
            path, n = self.dirs["seg"] / f"{base}.dcm", 1
            while path.exists():  # local copies are never overwritten
                n += 1
                path = self.dirs["seg"] / f"{base}-{n}.dcm"
            return path

        def pixels() -> list[np.ndarray]:  # the overlay burns outlines into the slices: read again
            return [decode_hu(read_dataset(i.path), i.path.name) for i in ordered]

        written = write_outputs(result, self.options.outputs, target, series_uid=state.seg_series_uid,
                                instance_number=number, hu=pixels)
        if self.options.forward:
            for paths in written.values():
                for p in paths:
                    with atomic_path(self.dirs["outbox"] / p.name) as tmp:
                        shutil.copyfile(p, tmp)
        return written, SegState(state.seg_series_uid, number)
