"""The segmentation worker: one thread that segments complete series (and, while idle, slices
of series still arriving) and writes one SEG per batch, superseding earlier SEGs of a series.

A 3D model cannot segment ahead: its windows span many slices, so a series is segmented as one
volume once it is complete (the node says so in its ready line). While it arrives, its slices are
decoded ahead instead (same cache and bound), so completion costs the segmentation and the SEG.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.checks import is_valid_uid
from attunet_deploy.apps.dicom.config import NodeLog
from attunet_deploy.apps.dicom.monitor import NodeMetrics
from attunet_deploy.apps.dicom.series import segment_series, segment_slices, stream_masks
from attunet_deploy.apps.dicom.spool import SegState, Spool, instance_key, series_of
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import atomic_path
from attunet_deploy.io.dicom import Instance, decode_hu, dicom_header, has_pixel_data, header_of, read_dataset
from attunet_deploy.io.dicom_series import (
    dedupe_series,
    order_slices,
    unusable_reason,
)
from attunet_deploy.runtimes.base import Runner

#: Masks (2D) or decoded HU slices (3D) computed ahead of a series' completion, at most this many bytes
#: kept in memory.
PRESEGMENT_CACHE_BYTES = 256 << 20


PRESEGMENT_BATCH = 8


#: Set to "worker" to make the worker thread die on its next job (tests of /healthz only).
FAULT_ENV = "ATTDEPLOY_NODE_FAULT"


@dataclass(frozen=True)
class SegOptions:
    """What the node's SEGs say: the bundle's graphs' precision (its sha256 goes into the SEG), the
    segment label, and whether a copy is queued for the forwarder."""

    precision: str
    segment_label: str = "Target"
    forward: bool = False


class Worker:
    """Series in, SEG out: one thread over a spool, with a runner, and its own cache of what it
    computed ahead (2D: masks of slices still arriving; 3D: their decoded HU)."""

    def __init__(self, spool: Spool, runner: Runner, bundle: Bundle, options: SegOptions, stop: threading.Event
                 ) -> None:
        self.spool, self.runner, self.bundle, self.options, self.stop = spool, runner, bundle, options, stop
        self.log: NodeLog = spool.log
        self.metrics: NodeMetrics = spool.metrics
        self.dirs = spool.dirs
        #: masks (2D) or decoded slices (3D) computed while a series was still arriving
        self.masks: dict[tuple[str, int, int], np.ndarray] = {}
        self.mask_bytes = 0
        self.decoded_ahead = 0

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
                     device=runner.device)
            while not self.stop.is_set():
                try:
                    job = self.spool.jobs.get(timeout=0.05)
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
                    self.spool.done(job)

    def _fail(self, job: Path, reason: str) -> None:
        for f in job.glob("*.dcm"):
            key = instance_key(f)
            m = self.masks.pop(key, None) if key is not None else None
            if m is not None:
                self.mask_bytes -= m.nbytes
        self.spool.fail(job, reason)

    def _presegment(self, runner: Runner) -> None:
        """While the worker is idle, segment instances of series that are still arriving (2D: slices
        are independent), or decode them (3D), so that a completed series needs little more than its SEG."""
        if self.mask_bytes >= PRESEGMENT_CACHE_BYTES:
            self.stop.wait(0.1)
            return
        for series in self.spool.arriving():
            todo = []
            for f in sorted(series.glob("*.dcm")):
                key = instance_key(f)
                if key is not None and key not in self.masks:
                    todo.append((f, key))
                if len(todo) == PRESEGMENT_BATCH:
                    break
            if not todo:
                continue
            slices: list[np.ndarray] = []
            keys: list[tuple[str, int, int]] = []
            for f, key in todo:
                try:
                    hu = decode_hu(read_dataset(f), f)
                except (OSError, InputError):
                    continue  # moved to processing/ meanwhile, or undecodable: the worker handles it there
                if slices and hu.shape != slices[0].shape:
                    break
                slices.append(hu)
                keys.append(key)
            if not slices:
                continue
            # A 3D model keeps the decoded slices (its windows need the whole series); a 2D one their masks.
            masks = slices if runner.spatial_dims == 3 else list(segment_slices(runner, np.stack(slices),
                                                                                batch=PRESEGMENT_BATCH))
            for key, m in zip(keys, masks):
                self.masks[key] = m
                self.mask_bytes += m.nbytes
            return
        self.stop.wait(0.05)

    def _take_masks(self, ordered: list[Instance], runner: Runner
                    ) -> tuple[list[np.ndarray], list[tuple[Instance, str]], int]:
        """Masks for ``ordered`` instances: computed ahead where possible, the rest now.

        Returns (masks uint8 [H, W] per usable instance, [(instance, reason)] left out because their
        pixels do not decode, how many masks were computed ahead)."""
        if runner.spatial_dims == 3:
            return self._volume_masks(ordered, runner)
        masks: list[np.ndarray | None] = []
        for inst in ordered:
            key = instance_key(inst.path)
            m = self.masks.pop(key, None) if key is not None else None
            if m is not None:
                self.mask_bytes -= m.nbytes
            masks.append(m)
        ahead = sum(m is not None for m in masks)
        bad: dict[int, str] = {}
        batches: list[list[int]] = []  # instance indices of each batch streamed

        def decoded() -> Iterator[np.ndarray]:
            """The missing slices, read as the stream reaches them, in batches of one slice shape."""
            part: list[int] = []
            slices: list[np.ndarray] = []
            for i in [i for i, m in enumerate(masks) if m is None]:
                try:
                    hu = decode_hu(read_dataset(ordered[i].path), ordered[i].path.name)
                except Exception as exc:
                    bad[i] = str(exc)[:200]
                    continue
                if slices and (hu.shape != slices[0].shape or len(slices) == PRESEGMENT_BATCH):
                    batches.append(part)
                    yield np.stack(slices)
                    part, slices = [], []
                part.append(i)
                slices.append(hu)
            if slices:
                batches.append(part)
                yield np.stack(slices)

        # One stream for the whole rest of the series: reading overlaps inference, and OpenVINO keeps
        # its streams busy across batches.
        for k, batch_masks in enumerate(stream_masks(runner, decoded())):
            for i, m in zip(batches[k], batch_masks):
                masks[i] = m
        left_out = [(ordered[i], bad[i]) for i in sorted(bad)]
        return [m for i, m in enumerate(masks) if i not in bad and m is not None], left_out, ahead

    def _volume_masks(self, ordered: list[Instance], runner: Runner
                      ) -> tuple[list[np.ndarray], list[tuple[Instance, str]], int]:
        """A 3D model's masks: the whole series as one volume. A slice that does not decode would leave a
        gap in the volume, so it fails the series (with the slice named) rather than being left out."""
        slices = []
        ahead = 0
        for inst in ordered:
            key = instance_key(inst.path)
            hu = self.masks.pop(key, None) if key is not None else None  # decoded while the series arrived
            if hu is not None:
                self.mask_bytes -= hu.nbytes
                ahead += 1
                slices.append(hu)
                continue
            try:
                slices.append(decode_hu(read_dataset(inst.path), inst.path.name))
            except Exception as exc:
                raise InputError(f"slice {inst.path.name} does not decode ({str(exc)[:160]}): a 3D model needs "
                                 "every slice of the volume") from None
        self.decoded_ahead = ahead
        masks = segment_series(runner, ordered, np.stack(slices))
        return list(masks), [], 0

    def _process(self, runner: Runner, job: Path) -> None:
        series = series_of(job)
        if not is_valid_uid(series):
            raise InputError(f"spool folder {job.name} is not named after a series UID")
        archive = self.dirs["archive"] / series
        marker = job / ".seg-written"
        if not marker.exists():
            self._segment_batch(runner, job, series, archive, marker)
        done = json.loads(marker.read_text())
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
        """Segment one batch (with the series' earlier instances) and write its SEG; ``marker`` records it."""
        t0 = time.perf_counter()
        instances, headers, left_out, earlier = self._read_batch(job, series, archive)
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
            self.spool.leave_out(series, f, reason)
        if not ordered:
            raise InputError("no instance of the series could be decoded")
        seg, seg_path, state = self._write_seg(series, [headers[i.path] for i in ordered], masks)
        number = state.number
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"seg": str(seg_path), "number": number,
                                       "seg_series_uid": state.seg_series_uid}))
        self.metrics.count("segs_written")
        self.metrics.count("segmented")
        self.metrics.observe_inference(t_seg)
        self.log("written", f"SEG of series {series}: {len(ordered)} slices, {int(seg.NumberOfFrames)} frame(s) "
                 f"with mask, {time.perf_counter() - t0:.2f} s", series=series, seg=str(seg_path),
                 slices=len(ordered), frames=int(seg.NumberOfFrames), seconds=round(time.perf_counter() - t0, 4),
                 segment_seconds=round(t_seg, 4), segmented_ahead=ahead,
                 decoded_ahead=self.decoded_ahead if runner.spatial_dims == 3 else None,
                 seg_instance_number=number,
                 supersedes=number - 1 if number > 1 else None, earlier_instances=earlier)

    def _write_seg(self, series: str, datasets: list[Any], masks: list[np.ndarray]
                   ) -> tuple[Any, Path, SegState]:
        """The SEG of ``series`` (next InstanceNumber of its SEG series), in seg/ and queued in outbox/;
        returns it, its path and the SEG series state it was numbered in (saved later, with the marker)."""
        from attunet_deploy.apps.dicom.files import model_sha256
        from attunet_deploy.apps.dicom.seg import SegNaming, build_seg, write_seg

        state = self.spool.seg_state(series)
        number = state.number + 1
        seg = build_seg(datasets, np.stack(masks), SegNaming.of(self.bundle, self.options.segment_label),
                        model_sha256=model_sha256(self.bundle, self.options.precision),
                        series_instance_uid=state.seg_series_uid, instance_number=number)
        seg_path = self.dirs["seg"] / f"SEG_{series}_{number}.dcm"
        k = 1
        while seg_path.exists():  # local copies are never overwritten
            k += 1
            seg_path = self.dirs["seg"] / f"SEG_{series}_{number}-{k}.dcm"
        write_seg(seg, seg_path)
        if self.options.forward:
            with atomic_path(self.dirs["outbox"] / seg_path.name) as tmp:
                shutil.copyfile(seg_path, tmp)
        return seg, seg_path, SegState(state.seg_series_uid, number)
