"""Read images (.npy/.npz, PNG/TIFF/JPEG, DICOM, NIfTI) as raw intensities, bounded in memory.

Readers return raw intensities (DICOM with its rescale applied, so HU for CT); the bundle's
normalisation is applied afterwards exactly as at run time
(:func:`attunet_deploy.preprocess.normalize`). Images of different sizes are fine.

Every reader checks sizes before decoding (see :mod:`attunet_deploy.limits`): a file that is
not a regular file, too large, or declares more pixels than the limit is refused with a
message naming the limit and how to raise it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError
from attunet_deploy.io.arrays import ImageRecord, check_numeric, load_npy, load_npz, match_channels, to_chw_list
from attunet_deploy.io.dicom import read_dicom_images
from attunet_deploy.io.files import (
    NIFTI_EXT,
    RASTER_EXT,
    SUPPORTED,
    is_dicom_file,
    list_image_files,
    reading,
    relative_name,
    suffix_of,
)
from attunet_deploy.segmenter import Segmenter


def read_file(path: Path, channels: int, rel: str = "") -> list[ImageRecord]:
    """All 2D images in one file, as raw intensities; each record's ``meta["count"]`` is how many
    images the file holds (a label must have as many slices)."""
    records = _read_file(path, channels, rel)
    for r in records:
        r.meta["count"] = len(records)
    return records


def _read_file(path: Path, channels: int, rel: str = "") -> list[ImageRecord]:
    suffix = suffix_of(path)
    rel = rel or path.name
    with reading(path):
        if suffix == ".npy":
            return [ImageRecord(a, path, i, {"multi": True}, rel) for i, a in
                    enumerate(to_chw_list(load_npy(path), channels, path))]
        if suffix == ".npz":
            arrays = to_chw_list(load_npz(path), channels, path)
            return [ImageRecord(a, path, i, {"multi": True}, rel) for i, a in enumerate(arrays)]
        if suffix in RASTER_EXT:
            return [_read_raster(path, channels, rel)]
        if suffix in NIFTI_EXT:
            return _read_nifti(path, channels, rel)
        if is_dicom_file(path):
            return read_dicom_images(path, channels, rel)
    raise InputError(f"{path}: unsupported file type (supported: {SUPPORTED})")


def open_raster(path: Path) -> Any:
    from PIL import Image

    limits.check_file_size(path, limits.IMAGE_FILE, "image")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says how to raise it
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    limits.check_pixels(h, w, path)
    return im


def _read_raster(path: Path, channels: int, rel: str) -> ImageRecord:
    with open_raster(path) as im:
        if im.mode in ("P", "LA", "PA", "1"):
            im = im.convert("RGBA" if "A" in im.mode else "L")
        arr = np.asarray(im, dtype=np.float32)
    return ImageRecord(match_channels(arr, channels, path), path, 0, {}, rel)


def open_nifti(path: Path) -> Any:
    import nibabel as nib

    limits.check_file_size(path, limits.IMAGE_FILE, "NIfTI file")
    img = nib.load(str(path))
    header: Any = img.header  # a NIfTI header (nibabel types it as the generic file header)
    shape = tuple(int(s) for s in header.get_data_shape())
    check_numeric(np.dtype(header.get_data_dtype()), path)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise InputError(f"{path}: NIfTI with {len(shape)} dimensions; 2D images or 3D volumes only")
    limits.check_pixels(shape[0], shape[1], path)
    total = int(np.prod(shape, dtype=np.float64)) * 4
    if total > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, total, limits.IMAGE_FILE)
    from attunet_deploy.io.volumes import check_claimed_size

    check_claimed_size(path, header, int(np.prod(shape, dtype=np.float64)))
    return img


def nifti_data(img: Any) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    return data


def _read_nifti(path: Path, channels: int, rel: str) -> list[ImageRecord]:
    img = open_nifti(path)
    data = nifti_data(img)
    meta: dict[str, Any] = {"multi": data.shape[2] > 1, "affine": np.asarray(img.affine), "nifti_shape": data.shape}
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if len(zooms) == 3 and all(np.isfinite(z) and z > 0 for z in zooms):
        # NIfTI axes (i, j, k) are stored as [H, W] = (i, j) slices along k
        meta.update(pixel_spacing=(zooms[0], zooms[1]), slice_thickness=zooms[2])
    return [ImageRecord(match_channels(data[:, :, k], channels, path), path, k, meta, rel)
            for k in range(data.shape[2])]


def iter_images(path: str | os.PathLike[str], channels: int) -> Iterator[ImageRecord]:
    root = Path(path)
    for f in list_image_files(root):
        yield from read_file(f, channels, relative_name(f, root))


def load_images(path: str | os.PathLike[str], channels: int, max_samples: int | None = None) -> list[ImageRecord]:
    """Every image at ``path``; with ``max_samples``, an evenly spaced deterministic subset."""
    if max_samples is not None and max_samples < 1:
        raise InputError("--max-samples must be >= 1")
    root = Path(path)
    files = list_image_files(root)
    per_file = None
    if max_samples is not None:
        files, per_file = sample_files(files, max_samples)
    records: list[ImageRecord] = []
    for f in files:
        records += subsample(read_file(f, channels, relative_name(f, root)), per_file)
        check_held(records)
    if not records:
        raise InputError(f"no images found in {path}")
    return subsample(records, max_samples)


def sample_files(files: list[Path], max_images: int) -> tuple[list[Path], int]:
    """(files to read, images to keep of each): a folder is sampled by file *before* any pixel is
    decoded, so a command holds about ``max_images`` images however many files the folder has."""
    if len(files) > max_images:
        idx = np.unique(np.linspace(0, len(files) - 1, max_images).round().astype(int))
        files = [files[i] for i in idx]
    return files, max(1, math.ceil(max_images / max(1, len(files))))


def check_held(records: list[ImageRecord]) -> None:
    """The memory budget of decoded images one command holds at once (a named, raisable limit)."""
    held = sum(r.pixels.nbytes for r in records)
    if held > limits.HELD_IMAGES.bytes():
        raise InputError(f"the images kept for this command take {held / 2**20:,.0f} MB decoded, above the "
                         f"{limits.HELD_IMAGES.what} limit of {limits.HELD_IMAGES.describe()}: use fewer or smaller "
                         f"images, or set {limits.HELD_IMAGES.env} to raise it")


def subsample(records: list[ImageRecord], max_samples: int | None) -> list[ImageRecord]:
    if max_samples is not None and len(records) > max_samples:
        idx = np.unique(np.linspace(0, len(records) - 1, max_samples).round().astype(int))
        records = [records[i] for i in idx]
    return records


def model_inputs(records: list[ImageRecord], segmenter: Segmenter) -> list[np.ndarray]:
    """Raw records -> normalised, padded float32 [1, C, H, W] arrays, one per image."""
    return [segmenter.pad(segmenter.prepare(rec.pixels[None], rec.label))[0] for rec in records]
