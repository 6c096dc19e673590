"""A CT series through a model: a 2D model segments the HU stack slice batch by slice batch
(:func:`segment_slices`), a 3D model segments it as one volume through its sliding window at the
series' own voxel spacing (grouping, ordering and geometry live in :mod:`attunet_deploy.io.dicom_series`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from attunet_deploy.io.dicom import Instance
from attunet_deploy.io.dicom_series import series_spacing
from attunet_deploy.runtimes.base import Runner

Observe = Callable[[np.ndarray], Any] | None


#: Slices per request. Two, not eight: on ONNX Runtime CPU a 512x512 batch of 8 holds a 2.2 GB arena for
#: 1-2 % less time per slice than a batch of 2 (0.6 GB); benchmarks/dicom_node.py reports the node's RSS.
SLICE_BATCH = 2


def segment_slices(runner: Runner, hu: np.ndarray, batch: int = SLICE_BATCH, observe: Observe = None) -> np.ndarray:
    """uint8 masks [N, H, W] of a 2D model over an HU stack [N, H, W], ``batch`` slices per request;
    the batches are streamed (``Runner.segment_many``: OpenVINO keeps several in flight)."""
    stacks = (hu[s:s + batch] for s in range(0, len(hu), batch))
    return np.concatenate(list(stream_masks(runner, stacks, observe)))


def stream_masks(runner: Runner, stacks: Iterable[np.ndarray], observe: Observe = None) -> Iterator[np.ndarray]:
    """uint8 masks [n, H, W] of each HU stack [n, H, W], in order, through one request stream: a stack
    is taken (read, decoded) only when the stream has room for it."""
    channels = runner.channels

    def raw_batches() -> Iterator[np.ndarray]:
        for hu in stacks:
            x = hu[:, None]
            yield np.repeat(x, channels, axis=1) if channels > 1 else x

    return runner.segment_many(raw_batches(), observe)


def segment_series(runner: Runner, ordered: list[Instance], hu: np.ndarray, batch: int = SLICE_BATCH,
                   observe: Observe = None) -> np.ndarray:
    """uint8 masks [N, H, W] of a series ordered along its normal (``hu`` [N, H, W] in that order).

    A 3D model takes the series as one volume: its spacing (z from the slice positions, y and x from
    PixelSpacing; irregular gaps or gantry tilt refused with the reason) is what ``segment_volume``
    resamples to the bundle's spacing."""
    if runner.spatial_dims != 3:
        return segment_slices(runner, hu, batch, observe)
    spacing = series_spacing(ordered)
    vol = hu if runner.channels == 1 else np.repeat(hu[None], runner.channels, axis=0)
    return runner.segment_volume(vol, spacing=spacing, observe=observe)
