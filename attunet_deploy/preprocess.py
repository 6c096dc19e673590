"""Input checks, intensity normalisation, pad-to-divisor / crop-back, and mask post-processing.

Every runner goes through these functions, so every backend sees identical padded inputs
and returns logits of the caller's H and W. numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from attunet_deploy.errors import InputError
from attunet_deploy.limits import check_pixels

_NUMERIC_KINDS = "biuf"  # bool, signed/unsigned int, float


def check_batch(images: Any, channels: int, *, name: str = "images") -> np.ndarray:
    """Validate a model-space batch and return it as C-contiguous float32 [N, C, H, W].

    Raises :class:`InputError` (a ``ValueError``) for a wrong rank, channel count, an empty
    batch or empty spatial axes, a non-numeric dtype, or non-finite values.
    """
    arr = np.asarray(images)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 4:
        hint = " (add a batch axis: x[None])" if arr.ndim == 3 else ""
        raise InputError(f"{name} must be [N, C, H, W], got shape {tuple(arr.shape)}{hint}")
    n, c, h, w = arr.shape
    if n == 0:
        raise InputError(f"{name} is an empty batch (N=0)")
    if c != channels:
        raise InputError(f"{name} has {c} channels, the model takes {channels}: shape {tuple(arr.shape)}")
    if h == 0 or w == 0:
        raise InputError(f"{name} has an empty spatial axis: shape {tuple(arr.shape)}")
    check_pixels(h, w, name)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{name} contains {bad} NaN/Inf values; clean or mask them before inference")
    return arr


def padded_size(h: int, w: int, divisor: int) -> tuple[int, int]:
    return (-(-h // divisor) * divisor, -(-w // divisor) * divisor)


def pad_to_divisor(x: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad H and W (bottom/right) up to multiples of ``divisor``; return the padded array and
    the original (H, W) for :func:`crop`.

    Reflection keeps image statistics at the border (zeros may be a meaningful intensity);
    a 1-pixel axis cannot reflect, so it is replicated.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, w, divisor)
    if (ph, pw) == (h, w):
        return x, (h, w)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph - h), (0, pw - w)]
    if min(h, w) > 1:
        return np.ascontiguousarray(np.pad(x, pad, mode="reflect")), (h, w)
    return np.ascontiguousarray(np.pad(x, pad, mode="edge")), (h, w)


def crop(y: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if y.shape[-2:] == (h, w):
        return y
    return np.ascontiguousarray(y[..., :h, :w])


# --------------------------------------------------------------------- normalisation
def parse_normalization(spec: str | None) -> dict[str, Any]:
    """Parse a CLI normalisation spec into the manifest's ``preprocessing`` dict.

    ``none`` | ``ct-window:LEVEL,WIDTH`` | ``mean-std:MEAN,STD`` (per-channel values joined
    by ``/``, e.g. ``mean-std:0.485/0.456/0.406,0.229/0.224/0.225``) | ``scale:DIVISOR`` |
    ``minmax`` (per image and channel to [0, 1]).
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return {"normalize": {"kind": "none"}}
    kind, _, args = spec.strip().partition(":")
    kind = kind.lower()

    def num(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError
        return v

    try:
        if kind == "ct-window":
            level, width = (num(v) for v in args.split(","))
            if width <= 0:
                raise ValueError
            return {"normalize": {"kind": "ct_window", "level": level, "width": width}}
        if kind == "mean-std":
            mean_s, std_s = args.split(",")
            mean = [num(v) for v in mean_s.split("/")]
            std = [num(v) for v in std_s.split("/")]
            if any(s <= 0 for s in std):
                raise ValueError
            return {"normalize": {"kind": "mean_std", "mean": mean, "std": std}}
        if kind == "scale":
            div = num(args)
            if div == 0:
                raise ValueError
            return {"normalize": {"kind": "scale", "divisor": div}}
        if kind == "minmax" and not args:
            return {"normalize": {"kind": "minmax"}}
    except ValueError:
        pass
    raise InputError(f"bad --normalize {spec!r}: use none, ct-window:LEVEL,WIDTH (width > 0), "
                     "mean-std:MEAN,STD (std > 0), scale:DIVISOR (not 0) or minmax, with finite numbers")


def normalize(images: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Apply the bundle's intensity normalisation to raw [N, C, H, W] images (float32 out)."""
    spec = preprocessing.get("normalize", {"kind": "none"})
    kind = spec.get("kind", "none")
    x = np.asarray(images, dtype=np.float32)
    if kind == "none":
        return x
    if kind == "ct_window":
        lo = spec["level"] - spec["width"] / 2.0
        return np.clip((x - lo) / spec["width"], 0.0, 1.0).astype(np.float32)
    if kind == "mean_std":
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)
    if kind == "scale":
        return (x / np.float32(spec["divisor"])).astype(np.float32)
    if kind == "minmax":
        lo = x.min(axis=(2, 3), keepdims=True)
        hi = x.max(axis=(2, 3), keepdims=True)
        return ((x - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)
    raise InputError(f"unknown normalisation kind {kind!r} in the bundle manifest")


def describe_normalization(preprocessing: dict[str, Any]) -> str:
    spec = preprocessing.get("normalize", {"kind": "none"})
    kind = spec.get("kind", "none")
    if kind == "ct_window":
        return f"CT window L{spec['level']:g}/W{spec['width']:g}"
    if kind == "mean_std":
        return f"(x - {spec['mean']}) / {spec['std']}"
    if kind == "scale":
        return f"x / {spec['divisor']:g}"
    return kind


# --------------------------------------------------------------------- post-processing
def default_postprocessing(out_channels: int) -> dict[str, Any]:
    if out_channels == 1:
        return {"kind": "sigmoid_threshold", "threshold": 0.5}
    return {"kind": "argmax"}


def logits_to_masks(logits: np.ndarray, postprocessing: dict[str, Any]) -> np.ndarray:
    """[N, K, H, W] logits -> uint8 [N, H, W] masks (sigmoid > threshold, or argmax)."""
    kind = postprocessing.get("kind", "sigmoid_threshold" if logits.shape[1] == 1 else "argmax")
    if kind == "sigmoid_threshold":
        t = float(postprocessing.get("threshold", 0.5))
        if not 0.0 < t < 1.0:
            raise InputError(f"sigmoid threshold must be in (0, 1), got {t}")
        # sigmoid(z) > t  <=>  z > logit(t); avoids computing exp on every pixel.
        return (logits[:, 0] > np.log(t / (1.0 - t))).astype(np.uint8)
    if kind == "argmax":
        return np.argmax(logits, axis=1).astype(np.uint8)
    raise InputError(f"unknown postprocessing kind {kind!r} in the bundle manifest")


def parse_shape(text: str, channels: int | None = None) -> tuple[int, int, int, int]:
    """'1x3x256x256' -> (1, 3, 256, 256); checks four positive ints, the channel count and size limits."""
    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise InputError(f"bad shape {text!r}: expected NxCxHxW with positive integers, e.g. 1x3x256x256")
    if channels is not None and dims[1] != channels:
        raise InputError(f"shape {text} has {dims[1]} channels, the model takes {channels}: use "
                         f"{dims[0]}x{channels}x{dims[2]}x{dims[3]}")
    if dims[0] > 4096:
        raise InputError(f"shape {text}: batch {dims[0]} is above 4096")
    check_pixels(dims[2], dims[3], f"shape {text}")
    return dims  # type: ignore[return-value]
