"""Label masks: matching them to images by relative name, checking their sizes from headers, reading them.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError
from attunet_deploy.io.arrays import ImageRecord, check_numeric, load_npy, load_npz, npy_header
from attunet_deploy.io.dicom import dicom_header
from attunet_deploy.io.files import (
    LABEL_EXT,
    NIFTI_EXT,
    RASTER_EXT,
    list_image_files,
    reading,
    relative_name,
    stem_key,
    suffix_of,
)
from attunet_deploy.io.images import nifti_data, open_nifti, open_raster


# ===================================================================================== labels
def label_index(labels: str | os.PathLike[str]) -> dict[str, Path]:
    """Label files under ``labels`` keyed by relative path without extension."""
    root = Path(labels)
    files = list_image_files(root, exts=LABEL_EXT)
    index: dict[str, Path] = {}
    for f in files:
        key = stem_key(relative_name(f, root))
        if key in index:
            raise InputError(f"two label files for the same image: {index[key]} and {f}")
        index[key] = f
    return index


def match_labels(image_files: list[Path], image_root: Path, labels: str | os.PathLike[str]) -> dict[Path, Path]:
    """image file -> label file by relative path without extension; InputError naming the first
    image without a label or label without an image."""
    index = label_index(labels)
    keys: dict[str, Path] = {}
    for f in image_files:
        key = stem_key(relative_name(f, image_root))
        if key in keys:
            raise InputError(f"images {keys[key]} and {f} differ only by extension, so one label {key}.* cannot "
                             "belong to both: rename one of them")
        keys[key] = f
    for key, f in keys.items():
        if key not in index:
            raise InputError(f"no label for image {f}: expected {key}.png (or .npy/.tif/.nii.gz) under {labels}")
    for key, lf in index.items():
        if key not in keys:
            raise InputError(f"label {lf} has no image: expected an image named {key}.* under {image_root}")
    return {f: index[key] for key, f in keys.items()}


def _array_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(H, W) of an array laid out [H, W], [N, H, W] or [N, C, H, W]."""
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{path} has shape {list(shape)}: expected [H, W], [N, H, W] or [N, C, H, W]")
    if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] > 4 and shape[1] > 4:
        raise InputError(f"{path} has shape {list(shape)}, which looks channels-last: save it as [H, W] or "
                         "[N, H, W]")
    return int(shape[-2]), int(shape[-1])


def header_hw(path: Path) -> tuple[int, int]:
    """(H, W) of an image or label file from its header alone (no pixel data decoded)."""
    suffix = suffix_of(path)
    with reading(path):
        if suffix == ".npy":
            limits.check_regular_file(path)
            with open(path, "rb") as fh:
                shape, _ = npy_header(fh, path)
            return _array_hw(shape, path)
        if suffix == ".npz":
            limits.check_regular_file(path)
            with zipfile.ZipFile(path) as zf:
                members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
                if not members:
                    raise InputError(f"{path}: empty .npz")
                names = [m.filename[:-4] for m in members]
                with zf.open(members[names.index("images")] if "images" in names else members[0]) as fh:
                    shape, _ = npy_header(fh, path)
            return _array_hw(shape, path)
        if suffix in RASTER_EXT:
            with open_raster(path) as im:
                return im.size[1], im.size[0]
        if suffix in NIFTI_EXT:
            shape = open_nifti(path).header.get_data_shape()
            return int(shape[0]), int(shape[1])
        head = dicom_header(path)
        return int(getattr(head, "Rows", 0) or 0), int(getattr(head, "Columns", 0) or 0)


def check_label_shapes(pairs: dict[Path, Path]) -> None:
    """Every image and its label have the same H and W (headers only); InputError naming the pair."""
    for image, label in pairs.items():
        hi, wi = header_hw(image)
        hl, wl = header_hw(label)
        if (hi, wi) != (hl, wl):
            raise InputError(f"label {label} is {hl}x{wl}, image {image} is {hi}x{wi}: shapes must match")


def read_label_file(path: Path, num_classes: int) -> list[np.ndarray]:
    """Label masks in ``path`` as uint8 [H, W] per slice: binary (> 0) for one output channel (or
    two with argmax), class indices 0..K-1 otherwise."""
    suffix = suffix_of(path)
    with reading(path, "label "):
        if suffix == ".npy":
            arr = load_npy(path)
        elif suffix == ".npz":
            arr = load_npz(path)
        elif suffix in RASTER_EXT:
            with open_raster(path) as im:
                if im.mode == "P":
                    arr = np.asarray(im)  # palette index = class
                else:
                    arr = np.asarray(im.convert("I") if im.mode in ("I;16", "I;16B", "I") else im)
            if arr.ndim == 3:
                if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[2], 3))):
                    raise InputError(f"label {path} is a colour image: save masks as greyscale class indices")
                arr = arr[..., 0]
        elif suffix in NIFTI_EXT:
            arr = np.moveaxis(nifti_data(open_nifti(path)), 2, 0)
        else:
            raise InputError(f"label {path}: unsupported type (use {', '.join(LABEL_EXT)})")
    arr = np.asarray(arr)
    check_numeric(arr.dtype, path)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"label {path} has shape {arr.shape}: expected [H, W] or [N, H, W]")
    if not np.isfinite(arr).all():
        raise InputError(f"label {path} contains NaN/Inf")
    if num_classes <= 2:
        values = np.unique(arr)
        if values.size > 2:
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
            raise InputError(f"label {path} holds {values.size} values ({shown}) but the model has one foreground "
                             "class: save a two-valued mask (0 and the class), e.g. (label == K) for class K")
        return [(a > 0).astype(np.uint8) for a in arr]
    if np.any(arr < 0) or np.any(arr >= num_classes) or np.any(arr != np.round(arr)):
        raise InputError(f"label {path} holds values outside the class indices 0..{num_classes - 1}")
    return [a.astype(np.uint8) for a in arr]


def attach_labels(records: list[ImageRecord], label_files: dict[Path, Path], num_classes: int) -> list[np.ndarray]:
    """Label mask for each record (same order), checking slice counts and shapes."""
    cache: dict[Path, list[np.ndarray]] = {}
    out = []
    for rec in records:
        lf = label_files[rec.source]
        if lf not in cache:
            cache[lf] = read_label_file(lf, num_classes)
        masks = cache[lf]
        count = int(rec.meta.get("count", len(masks)))
        if len(masks) != count:
            raise InputError(f"label {lf} has {len(masks)} slice(s), image {rec.source} has {count}: one label "
                             "slice per image slice")
        m = masks[rec.index]
        if m.shape != rec.pixels.shape[1:]:
            raise InputError(f"label {lf} is {m.shape[0]}x{m.shape[1]}, image {rec.source} is "
                             f"{rec.pixels.shape[1]}x{rec.pixels.shape[2]}: shapes must match")
        out.append(m)
    return out
