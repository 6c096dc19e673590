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
from collections.abc import Callable
from typing import Any

import numpy as np

from attunet_deploy.bundle.spec import SlidingWindow
from attunet_deploy.errors import InputError

Predictor = Callable[[np.ndarray], np.ndarray]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of every window along one axis of ``size`` voxels (``size >= roi``)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 0) + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def importance_map(window: SlidingWindow) -> np.ndarray:
    """The weight of each voxel of a window, float32 of shape ``window.roi``."""
    if window.mode == "constant":
        return np.ones(window.roi, dtype=np.float32)
    weights = np.ones((), dtype=np.float32)
    for size in window.roi:
        sigma = size * window.sigma_scale
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        axis = np.exp(x ** 2 / np.float32(-2 * sigma ** 2)).astype(np.float32)
        weights = weights[..., None] * axis
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


#: Padding a volume up to the window may multiply it by at most this much (a volume thinner than
#: the window along an axis is padded to the window; a [1, 300000, 1] "volume" would grow 3,000-fold).
PAD_GROWTH_MAX = 64


def check_window_memory(shape: tuple[int, ...], window: SlidingWindow, out_channels: int = 2) -> None:
    """Refuse, before any allocation, a volume [N, C, *spatial] whose sliding-window pass would need
    more than ``ATTDEPLOY_MAX_WINDOW_MB`` (padded input, blended logits and weights, float32), or
    that padding to the window would inflate more than PAD_GROWTH_MAX-fold; the message names which."""
    from attunet_deploy import limits

    n, c, spatial = shape[0], shape[1], shape[2:]
    full = tuple(max(r, s) for r, s in zip(window.roi, spatial))
    voxels, padded = math.prod(spatial), math.prod(full)
    need = n * padded * (c + out_channels + 1) * 4
    shown = "x".join(map(str, spatial))
    roi = "x".join(map(str, window.roi))
    if padded > PAD_GROWTH_MAX * max(voxels, 1) and need > 64 << 20:
        raise InputError(f"a volume of {shown} voxels is much smaller than the {roi} window along some axis: "
                         f"padding it to {'x'.join(map(str, full))} would need {need / 2**30:.1f} GB; this is not a "
                         "volume for this model (check the file's shape and axis order)")
    if need > limits.WINDOW.bytes():
        raise InputError(f"a volume of {shown} voxels needs {need / 2**30:.1f} GB for the {roi} sliding window, above "
                         f"the limit of {limits.WINDOW.describe()}: set {limits.WINDOW.env} to raise it, or crop the "
                         "volume")


def sliding_window(predict: Predictor, x: np.ndarray, window: SlidingWindow,
                   progress: Callable[[int], Any] | None = None) -> np.ndarray:
    """Logits of ``x`` [N, C, *spatial] by ``window`` (its roi, overlap, blending and windows per call):
    ``predict`` maps [B, C, *roi] to [B, K, *roi]; returns float32 [N, K, *spatial]. ``progress`` is
    called with each batch's window count."""
    roi, overlap, batch = window.roi, window.overlap, window.batch
    if x.ndim != len(roi) + 2:
        raise InputError(f"input of shape {tuple(x.shape)} does not match a {len(roi)}D window {list(roi)}: "
                         f"expected [N, C, {', '.join('DHW'[-len(roi):] if len(roi) <= 3 else 'S' * len(roi))}]")
    n, spatial = x.shape[0], x.shape[2:]
    check_window_memory(tuple(x.shape), window)
    pads = [(0, 0), (0, 0)] + [((max(r - s, 0)) // 2, max(r - s, 0) - max(r - s, 0) // 2)
                               for r, s in zip(roi, spatial)]
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, pads)
    full = x.shape[2:]
    starts = np.stack(np.meshgrid(*[window_starts(s, r, overlap) for s, r in zip(full, roi)], indexing="ij"),
                      axis=-1).reshape(-1, len(roi))
    weight = importance_map(window)
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
