"""The worker's slices: segmented (2D) or decoded (3D) while their series still arrives, and the rest
when it is complete, with each slice's QA figures (intensity percentiles, uncertain voxels).

A 3D model cannot segment ahead: its windows span many slices, so a series is segmented as one
volume once it is complete; while it arrives, its slices are decoded ahead instead (same cache and
bound), so completion costs the segmentation and the results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attunet_deploy.apps.dicom.series import SLICE_BATCH, segment_series, segment_slices, stream_masks
from attunet_deploy.apps.dicom.spool import Spool, instance_key
from attunet_deploy.bundle.spec import Postprocessing
from attunet_deploy.errors import InputError
from attunet_deploy.io.dicom import Instance, decode_hu, read_dataset
from attunet_deploy.qa import MaskTally, slice_percentiles
from attunet_deploy.runtimes.base import Runner

#: Masks (2D) or decoded HU slices (3D) computed ahead of a series' completion, at most this many bytes.
PRESEGMENT_CACHE_BYTES = 256 << 20
PRESEGMENT_BATCH = SLICE_BATCH
Key = tuple[str, int, int]


@dataclass
class Ahead:
    """One slice done ahead: its mask (2D) or decoded HU (3D), its intensity percentiles and (2D) its
    (foreground, uncertain, region) voxel counts."""

    data: np.ndarray
    percentiles: tuple[float, float, float]
    counts: tuple[int, int, int] | None = None


@dataclass
class Taken:
    """A series' slices for its results: masks of the usable slices in order, the slices left out (and
    why), how many were done ahead, the QA tally and each slice's percentiles."""

    masks: list[np.ndarray]
    left_out: list[tuple[Instance, str]]
    ahead: int
    tally: MaskTally
    percentiles: list[tuple[float, float, float]] = field(default_factory=list)


class SliceWork:
    """What the worker computes per slice, and its cache of what it computed ahead."""

    def __init__(self, spool: Spool, runner: Runner, post: Postprocessing, stop: threading.Event) -> None:
        self.spool, self.runner, self.post, self.stop = spool, runner, post, stop
        self.cache: dict[Key, Ahead] = {}
        self.bytes = 0

    def _pop(self, path: Path) -> Ahead | None:
        key = instance_key(path)
        got = self.cache.pop(key, None) if key is not None else None
        if got is not None:
            self.bytes -= got.data.nbytes
        return got

    def drop(self, job: Path) -> None:
        """Forget what was done ahead for a job's instances (failed or refused)."""
        for f in job.glob("*.dcm"):
            self._pop(f)

    def ahead(self) -> None:
        """While the worker is idle, segment (2D) or decode (3D) a batch of a series still arriving."""
        if self.bytes >= PRESEGMENT_CACHE_BYTES:
            self.stop.wait(0.1)
            return
        for series in self.spool.arriving():
            todo = [(f, key) for f in sorted(series.glob("*.dcm"))
                    if (key := instance_key(f)) is not None and key not in self.cache][:PRESEGMENT_BATCH]
            slices: list[np.ndarray] = []
            keys: list[Key] = []
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
            self._keep(keys, slices)
            return
        self.stop.wait(0.05)

    def _keep(self, keys: list[Key], slices: list[np.ndarray]) -> None:
        pcts = [slice_percentiles(s) for s in slices]
        if self.runner.spatial_dims == 3:  # its windows need the whole series: keep the decoded slices
            items = [Ahead(s, p) for s, p in zip(slices, pcts)]
        else:
            counts: list[tuple[int, int, int]] = []
            tally = MaskTally(self.post)
            masks = segment_slices(self.runner, np.stack(slices), PRESEGMENT_BATCH,
                                   observe=lambda z: counts.extend(tally.counts(z)))
            items = [Ahead(m, p, c) for m, p, c in zip(masks, pcts, counts)]
        for key, item in zip(keys, items):
            self.cache[key] = item
            self.bytes += item.data.nbytes

    def take(self, ordered: list[Instance]) -> Taken:
        """Every slice of a complete series: from the cache where done ahead, the rest now."""
        if self.runner.spatial_dims == 3:
            return self._volume(ordered)
        got = [self._pop(i.path) for i in ordered]
        masks: list[np.ndarray | None] = [g.data if g else None for g in got]
        pcts: list[tuple[float, float, float] | None] = [g.percentiles if g else None for g in got]
        tally = MaskTally(self.post)
        for g in got:
            if g is not None and g.counts is not None:
                tally.add_counts(g.counts)
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
                pcts[i] = slice_percentiles(hu)
            if slices:
                batches.append(part)
                yield np.stack(slices)

        # One stream for the whole rest of the series: reading overlaps inference, and OpenVINO keeps
        # its streams busy across batches.
        for k, batch_masks in enumerate(stream_masks(self.runner, decoded(), observe=tally.add)):
            for i, m in zip(batches[k], batch_masks):
                masks[i] = m
        keep = [i for i in range(len(ordered)) if i not in bad and masks[i] is not None]
        return Taken([masks[i] for i in keep], [(ordered[i], bad[i]) for i in sorted(bad)],  # type: ignore[misc]
                     sum(g is not None for g in got), tally, [pcts[i] for i in keep])  # type: ignore[misc]

    def _volume(self, ordered: list[Instance]) -> Taken:
        """A 3D model's masks: the whole series as one volume. A slice that does not decode would leave a
        gap in the volume, so it fails the series (with the slice named) rather than being left out."""
        slices, pcts = [], []
        ahead = 0
        for inst in ordered:
            got = self._pop(inst.path)  # decoded while the series arrived
            if got is not None:
                ahead += 1
                slices.append(got.data)
                pcts.append(got.percentiles)
                continue
            try:
                hu = decode_hu(read_dataset(inst.path), inst.path.name)
            except Exception as exc:
                raise InputError(f"slice {inst.path.name} does not decode ({str(exc)[:160]}): a 3D model needs "
                                 "every slice of the volume") from None
            slices.append(hu)
            pcts.append(slice_percentiles(hu))
        tally = MaskTally(self.post)
        masks = segment_series(self.runner, ordered, np.stack(slices), observe=tally.add)
        return Taken(list(masks), [], ahead, tally, pcts)
