"""Sliding-window inference in numpy (no torch): a volume larger than the network's window is cut
into overlapping windows, each run through a predictor, and the logits blended back.

The rules are MONAI's ``sliding_window_inference`` (``monai.inferers.utils``), so that a model
trained and validated with MONAI is deployed with the same arithmetic:

- windows start every ``int(roi * (1 - overlap))`` voxels per axis (the whole axis when it is
  exactly one window), the last one pushed back to end at the border (``dense_patch_slices``);
- an axis shorter than the window is padded with zeros, half before and half after, and cropped
  back at the end;
- each window's logits are weighted by an importance map, ``constant`` (ones) or ``gaussian``
  (``exp(-x^2 / (2 sigma^2))`` per axis with ``sigma = sigma_scale * roi``, clamped below at
  ``max(min, 1e-3)``: ``compute_importance_map``), summed, and divided by the summed weights.

Memory: one float32 accumulator of the output ([N, K, *spatial]) and one of the weights
([*spatial]); windows are predicted ``batch`` at a time and added in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from attunet_deploy.errors import InputError

#: Blending modes, as MONAI names them.
MODES = ("gaussian", "constant")
Predictor = Callable[[np.ndarray], np.ndarray]


def check_window(roi: Sequence[int], overlap: float, mode: str, sigma_scale: float, batch: int) -> None:
    """InputError naming the first sliding-window setting that cannot work."""
    if not roi or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise InputError(f"roi {list(roi)}: needs positive integers, one per spatial axis")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap {overlap!r}: must be a number in [0, 1)")
    if mode not in MODES:
        raise InputError(f"sliding-window mode {mode!r}: choose {' or '.join(MODES)}")
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float)) \
            or not math.isfinite(sigma_scale) or sigma_scale <= 0:
        raise InputError(f"sigma_scale {sigma_scale!r}: must be a positive number")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise InputError(f"sliding-window batch {batch!r}: must be an integer in 1..4096")


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of every window along one axis of ``size`` voxels (``size >= roi``)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 0) + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """The weight of each voxel of a window, float32 of shape ``roi``."""
    if mode == "constant":
        return np.ones(tuple(roi), dtype=np.float32)
    if mode != "gaussian":
        raise InputError(f"sliding-window mode {mode!r}: choose {' or '.join(MODES)}")
    weights = np.ones((), dtype=np.float32)
    for size in roi:
        sigma = size * sigma_scale
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        axis = np.exp(x ** 2 / np.float32(-2 * sigma ** 2)).astype(np.float32)
        weights = weights[..., None] * axis
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window(predict: Predictor, x: np.ndarray, roi: Sequence[int], *, overlap: float = 0.5,
                   mode: str = "gaussian", sigma_scale: float = 0.125, batch: int = 1,
                   progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """Logits of ``x`` [N, C, *spatial] by windows of ``roi``: ``predict`` maps [B, C, *roi] to
    [B, K, *roi]; returns float32 [N, K, *spatial]. ``progress`` is called with each batch's window count."""
    roi = tuple(int(r) for r in roi)
    check_window(roi, overlap, mode, sigma_scale, batch)
    if x.ndim != len(roi) + 2:
        raise InputError(f"input of shape {tuple(x.shape)} does not match a {len(roi)}D window {list(roi)}: "
                         f"expected [N, C, {', '.join('DHW'[-len(roi):] if len(roi) <= 3 else 'S' * len(roi))}]")
    n, spatial = x.shape[0], x.shape[2:]
    pads = [(0, 0), (0, 0)] + [((max(r - s, 0)) // 2, max(r - s, 0) - max(r - s, 0) // 2)
                               for r, s in zip(roi, spatial)]
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, pads)
    full = x.shape[2:]
    starts = np.stack(np.meshgrid(*[window_starts(s, r, overlap) for s, r in zip(full, roi)], indexing="ij"),
                      axis=-1).reshape(-1, len(roi))
    weight = importance_map(roi, mode, sigma_scale)
    out: np.ndarray | None = None
    count = np.zeros(full, dtype=np.float32)
    jobs = [(i, tuple(int(s) for s in st)) for i in range(n) for st in starts]
    for k in range(0, len(jobs), batch):
        part = jobs[k:k + batch]
        # (all channels, then the window's box)
        boxes = [(slice(None), *(slice(s, s + r) for s, r in zip(st, roi))) for _, st in part]
        windows = np.stack([x[i][box] for (i, _), box in zip(part, boxes)])
        logits = np.asarray(predict(np.ascontiguousarray(windows, dtype=np.float32)), dtype=np.float32)
        if logits.shape[0] != len(part) or logits.shape[2:] != roi:
            raise InputError(f"the predictor returned {tuple(logits.shape)} for windows {tuple(windows.shape)}: "
                             f"expected [{len(part)}, K, {', '.join(map(str, roi))}]")
        if out is None:
            out = np.zeros((n, logits.shape[1], *full), dtype=np.float32)
        for (i, _), box, y in zip(part, boxes, logits):
            out[i][box] += y * weight
            if i == 0:
                count[box[1:]] += weight
        if progress is not None:
            progress(len(part))
    assert out is not None  # at least one window per image
    out /= count
    crop = (slice(None), slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads[2:], spatial)))
    return np.ascontiguousarray(out[crop])
