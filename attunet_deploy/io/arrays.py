"""In-memory images: :class:`ImageRecord`, numeric/shape checks, bounded ``.npy``/``.npz`` loading,
and channel layout ([N,C,H,W], [C,H,W], [H,W], channels-last) to [C, H, W].
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError


@dataclass
class ImageRecord:
    """One 2D image of ``channels`` channels as raw float32 [C, H, W], with where it came from."""

    pixels: np.ndarray
    source: Path
    index: int = 0  # slice/frame/array index inside the source file
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. NIfTI affine, for writing masks back
    rel: str = ""  # path relative to the folder the user named (for reports and label matching)

    @property
    def label(self) -> str:
        base = self.rel or self.source.name
        return f"{base}[{self.index}]" if self.meta.get("multi") else base


def to_chw_list(arr: np.ndarray, channels: int, source: Path) -> list[np.ndarray]:
    """Split an array into [C, H, W] images: accepts [N,C,H,W], [C,H,W], [N,H,W] (C=1), [H,W]."""
    arr = np.asarray(arr)
    check_numeric(arr.dtype, source)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        if arr.shape[0] != channels and channels != 1:
            raise InputError(f"{source}: a 3D array must be [C={channels}, H, W]")
        arr = arr[None] if arr.shape[0] == channels else arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise InputError(f"{source}: array of shape {np.shape(arr)} is not [N, {channels}, H, W], "
                         f"[{channels}, H, W] or [H, W]")
    return [a.astype(np.float32) for a in arr]


def check_numeric(dtype: np.dtype, source: object) -> None:
    if dtype.kind == "c":
        raise InputError(f"{source}: complex-valued data ({dtype}); save the magnitude or real part instead")
    if dtype.kind not in "biuf":
        raise InputError(f"{source}: array dtype {dtype} is not numeric")


def check_array_shape(shape: tuple[int, ...], dtype: np.dtype, source: object) -> None:
    check_numeric(dtype, source)
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{source}: array of shape {shape} is not an image or a stack of images")
    limits.check_pixels(int(shape[-2]), int(shape[-1]), source)
    total = int(np.prod(shape, dtype=np.float64)) * 4
    if total > limits.IMAGE_FILE.bytes():
        raise limits.too_large(str(source), total, limits.IMAGE_FILE)


def npy_header(fh: Any, source: object) -> tuple[tuple[int, ...], np.dtype]:
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = npformat.read_array_header_1_0(fh)
        else:
            shape, _, dtype = npformat.read_array_header_2_0(fh)
    except (ValueError, OSError) as exc:
        raise InputError(f"{source}: not a valid .npy array ({str(exc)[:100]})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def load_npy(path: Path) -> np.ndarray:
    limits.check_file_size(path, limits.IMAGE_FILE, "image")
    with open(path, "rb") as fh:
        shape, dtype = npy_header(fh, path)
    check_array_shape(shape, dtype, path)
    return np.load(path, allow_pickle=False)


def load_npz(path: Path) -> np.ndarray:
    limits.check_file_size(path, limits.IMAGE_FILE, "image")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a valid .npz archive ({str(exc)[:100]})") from None
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        if not members:
            raise InputError(f"{path}: empty .npz")
        names = [m.filename[:-4] for m in members]
        info = members[names.index("images")] if "images" in names else members[0]
        if info.file_size > limits.IMAGE_FILE.bytes():
            raise limits.too_large(f"{path}:{info.filename}", info.file_size, limits.IMAGE_FILE)
        with zf.open(info) as fh:
            shape, dtype = npy_header(fh, path)
        check_array_shape(shape, dtype, path)
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)


def match_channels(img: np.ndarray, channels: int, source: Path) -> np.ndarray:
    """[H, W] or [H, W, C] raster -> [C, H, W] with the model's channel count."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    have = img.shape[2]
    if have == channels:
        out = img
    elif channels == 1 and have == 3:
        out = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    elif have == 1:
        out = np.repeat(img, channels, axis=2)
    else:
        raise InputError(f"{source}: image has {have} channels, the model takes {channels}")
    return np.ascontiguousarray(np.transpose(out, (2, 0, 1)), dtype=np.float32)
