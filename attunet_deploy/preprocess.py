"""Input checks, intensity normalisation, pad-to-divisor / crop-back, and mask post-processing.

Every runner goes through these functions, so every backend sees identical padded inputs
and returns logits of the caller's H and W. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attunet_deploy.bundle.spec import Normalization, Postprocessing, Segment, check_segment_text
from attunet_deploy.errors import InputError
from attunet_deploy.limits import IMAGE_FILE, check_pixels, too_large

_NUMERIC_KINDS = "biuf"  # bool, signed/unsigned int, float


def _rank_hint(ndim: int, spatial_dims: int, channels: int) -> str:
    """The call that works for an array of ``ndim`` axes given to a bundle of ``spatial_dims``."""
    if spatial_dims == 3:
        if ndim == 3:
            return ": one volume [D, H, W] goes to runner.segment_volume(volume, spacing=(z, y, x)), or add the " \
                   "batch and channel axes: volume[None, None]"
        if ndim in (2, 4):
            return (": this bundle's model is 3D (NCDHW): segment a whole volume [D, H, W] with "
                    "runner.segment_volume(volume, spacing=(z, y, x)), not 2D slices")
        return ""
    if ndim == 2:
        return ": one slice [H, W]: x[None, None]"
    if ndim == 3:
        return (": a stack of one-channel slices [N, H, W]: x[:, None]" if channels == 1 else
                f": one {channels}-channel image [C, H, W]: x[None]")
    if ndim == 5:
        return ": this bundle's model is 2D (NCHW): give slices [N, C, H, W] (a volume's slices: volume[:, None])"
    return ""


def check_batch(images: Any, channels: int, *, name: str = "images", spatial_dims: int = 2) -> np.ndarray:
    """Validate a model-space batch and return it as C-contiguous float32 [N, C, *spatial]
    ([N, C, H, W] for 2D models, [N, C, D, H, W] for 3D ones).

    Raises :class:`InputError` (a ``ValueError``) for a wrong rank, channel count, an empty
    batch or empty spatial axes, a non-numeric dtype, or non-finite values.
    """
    arr = np.asarray(images)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    axes = "N, C, " + ", ".join("DHW"[-spatial_dims:])
    if arr.ndim != spatial_dims + 2:
        raise InputError(f"{name} must be [{axes}] for this {spatial_dims}D bundle, got shape {tuple(arr.shape)}"
                         f"{_rank_hint(arr.ndim, spatial_dims, channels)}")
    n, c = arr.shape[:2]
    if n == 0:
        raise InputError(f"{name} is an empty batch (N=0)")
    if c != channels:
        raise InputError(f"{name} has {c} channels, the model takes {channels}: shape {tuple(arr.shape)}")
    if 0 in arr.shape[2:]:
        raise InputError(f"{name} has an empty spatial axis: shape {tuple(arr.shape)}")
    h, w = arr.shape[-2:]
    check_pixels(h, w, name)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{name} contains {bad} NaN/Inf values; clean or mask them before inference")
    return arr


def padded_size(h: int, w: int, divisor: int) -> tuple[int, int]:
    return (-(-h // divisor) * divisor, -(-w // divisor) * divisor)


def divisors_for(divisor: int | Sequence[int]) -> tuple[int, ...]:
    """A divisor per padded axis: an int means the last two axes (H, W)."""
    return (int(divisor),) * 2 if isinstance(divisor, int) else tuple(int(d) for d in divisor)


def pad_to_divisor(x: np.ndarray, divisor: int | Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad the last axes (bottom/right) up to multiples of ``divisor`` (an int: H and W; a sequence:
    one per trailing spatial axis); return the padded array and the original sizes for :func:`crop`.

    Reflection keeps image statistics at the border (zeros may be a meaningful intensity);
    a 1-pixel axis cannot reflect, so it is replicated.
    """
    divs = divisors_for(divisor)
    size = tuple(int(v) for v in x.shape[-len(divs):])
    padded = tuple(-(-v // d) * d for v, d in zip(size, divs))
    if padded == size:
        return x, size
    pad = [(0, 0)] * (x.ndim - len(divs)) + [(0, p - v) for v, p in zip(size, padded)]
    if min(size) > 1:
        return np.ascontiguousarray(np.pad(x, pad, mode="reflect")), size
    return np.ascontiguousarray(np.pad(x, pad, mode="edge")), size


def crop(y: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """The first ``size`` voxels of the last ``len(size)`` axes (undoes :func:`pad_to_divisor`)."""
    if tuple(y.shape[-len(size):]) == tuple(size):
        return y
    index: tuple[Any, ...] = (Ellipsis, *(slice(0, v) for v in size))
    return np.ascontiguousarray(y[index])


# --------------------------------------------------------------------- normalisation
def normalize(images: np.ndarray, spec: Normalization) -> np.ndarray:
    """Apply an intensity normalisation to raw [N, C, *spatial] images (float32 out)."""
    kind = spec.kind
    x = np.asarray(images, dtype=np.float32)
    if kind == "none":
        return x
    if kind == "ct_window":
        lo = spec.level - spec.width / 2.0
        # One new array, then in place: the same float32 arithmetic as np.clip((x - lo) / width, 0, 1)
        # with a third of the memory traffic (this runs on every slice of a series).
        y = np.subtract(x, np.float32(lo), dtype=np.float32)
        np.divide(y, np.float32(spec.width), out=y)
        return np.clip(y, 0.0, 1.0, out=y)
    if kind == "mean_std":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(spec.std, dtype=np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.float32)
    if kind == "scale":
        return (x / np.float32(spec.divisor)).astype(np.float32)
    if kind == "minmax":
        spatial = tuple(range(2, x.ndim))
        lo = x.min(axis=spatial, keepdims=True)
        hi = x.max(axis=spatial, keepdims=True)
        return ((x - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)
    raise InputError(f"unknown normalisation kind {kind!r} in the bundle manifest")


# --------------------------------------------------------------------- post-processing
def parse_segments(specs: Sequence[str], out_channels: int) -> tuple[Segment, ...]:
    """``--segment CLASS=LABEL[@SCHEME:CODE:MEANING][#RRGGBB]`` options -> the manifest's
    ``postprocessing.segments`` (what each class is called and its colour in DICOM outputs): e.g.
    ``1=Pancreas@SCT:15776009:Pancreas#E6A000``. Classes are 1 for a one-channel model, 1..K-1 for K
    classes."""
    import re

    top = 1 if out_channels <= 2 else out_channels - 1
    out: list[dict[str, object]] = []  # as the manifest stores them, checked as such
    for spec in specs:
        text, color = spec, None
        if "#" in spec:
            text, _, hexcode = spec.rpartition("#")
            if not re.fullmatch(r"[0-9A-Fa-f]{6}", hexcode):
                raise InputError(f"segment {spec!r}: the colour is RGB as #RRGGBB, e.g. #E6A000", field="segments")
            color = [int(hexcode[i:i + 2], 16) for i in (0, 2, 4)]
        head, _, code = text.partition("@")
        cls_text, eq, label = head.partition("=")
        try:
            cls = int(cls_text)
        except ValueError:
            cls = -1
        if not eq or not 1 <= cls <= top:
            raise InputError(f"segment {spec!r}: expected CLASS=LABEL[@SCHEME:CODE:MEANING][#RRGGBB] with CLASS in "
                             f"1..{top}", field="segments")
        entry: dict[str, object] = {"class": cls, "label": label.strip()}
        if color is not None:
            entry["color"] = color
        if code:
            parts = code.split(":", 2)
            if len(parts) != 3:
                raise InputError(f"segment {spec!r}: the code is SCHEME:CODE:MEANING, e.g. SCT:15776009:Pancreas",
                                 field="segments")
            entry["type"] = [p.strip() for p in parts]
        try:
            check_segment_text(entry, top, f"segment {spec!r}")
        except InputError as exc:
            raise InputError(str(exc), field="segments") from None
        if any(e["class"] == cls for e in out):
            raise InputError(f"segment {spec!r}: class {cls} is named twice", field="segments")
        out.append(entry)
    return tuple(Segment.from_dict(e) for e in out)


def logits_to_masks(logits: np.ndarray, post: Postprocessing) -> np.ndarray:
    """[N, K, *spatial] logits -> uint8 [N, *spatial] masks (sigmoid > threshold, or argmax)."""
    kind = post.kind
    if kind == "sigmoid_threshold":
        t = post.threshold
        # sigmoid(z) > t  <=>  z > logit(t); avoids computing exp on every pixel.
        return (logits[:, 0] > np.log(t / (1.0 - t))).view(np.uint8)  # bool is one byte, 0 or 1: no copy
    if kind == "argmax":
        return np.argmax(logits, axis=1).astype(np.uint8)
    raise InputError(f"unknown postprocessing kind {kind!r} in the bundle manifest")


def parse_shape(text: str, channels: int | None = None, spatial_dims: int | None = None) -> tuple[int, ...]:
    """'1x3x256x256' -> (1, 3, 256, 256), '1x1x96x96x96' for 3D models; checks positive ints, the
    rank (``spatial_dims`` + 2 when given), the channel count and size limits."""
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    ranks = (spatial_dims + 2,) if spatial_dims is not None else (4, 5)
    if len(dims) not in ranks or any(d < 1 for d in dims):
        want = {4: "NxCxHxW, e.g. 1x3x256x256", 5: "NxCxDxHxW, e.g. 1x1x96x96x96"}
        raise InputError(f"bad shape {text!r}: expected " + " or ".join(want[r] for r in ranks)
                         + " (positive integers)")
    if channels is not None and dims[1] != channels:
        raise InputError(f"shape {text} has {dims[1]} channels, the model takes {channels}: use "
                         f"{'x'.join(map(str, (dims[0], channels, *dims[2:])))}")
    if dims[0] > 4096:
        raise InputError(f"shape {text}: batch {dims[0]} is above 4096")
    check_pixels(dims[-2], dims[-1], f"shape {text}")
    if len(dims) == 5 and math.prod(dims) * 4 > IMAGE_FILE.bytes():  # a volume is allocated whole
        raise too_large(f"shape {text}", math.prod(dims) * 4, IMAGE_FILE)
    return dims


# --------------------------------------------------------------------- voxel spacing
def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Voxel counts that cover the same extent at ``target`` spacing (at least 1 per axis)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target))


def _axis_positions(n_in: int, n_out: int) -> np.ndarray:
    # Voxel centres of the output in input coordinates (half-voxel aligned, as
    # torch.nn.functional.interpolate with align_corners=False), clipped to the input.
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(pos, 0.0, n_in - 1.0)


def resample_linear(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of the last ``len(shape)`` axes of ``x`` to ``shape`` (float32), one
    axis at a time (separable, so memory stays at one copy of the larger array)."""
    out = np.asarray(x, dtype=np.float32)
    first = out.ndim - len(shape)
    size = math.prod(out.shape[:first]) * math.prod(max(a, b) for a, b in zip(out.shape[first:], shape)) * 4
    if size > IMAGE_FILE.bytes():  # a spacing far coarser than the model's would blow the volume up
        raise too_large(f"volume resampled to {'x'.join(map(str, shape))} voxels", size, IMAGE_FILE)
    for k, n_out in enumerate(shape):
        axis = first + k
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        pos = _axis_positions(n_in, n_out)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (pos - lo).astype(np.float32).reshape((-1,) + (1,) * (out.ndim - axis - 1))
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return np.ascontiguousarray(out, dtype=np.float32)


def resample_nearest(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of the last ``len(shape)`` axes (labels keep their values)."""
    out = np.asarray(x)
    first = out.ndim - len(shape)
    for k, n_out in enumerate(shape):
        axis = first + k
        n_in = out.shape[axis]
        if n_in != n_out:
            idx = np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)
            out = np.take(out, idx, axis=axis)
    return np.ascontiguousarray(out)

