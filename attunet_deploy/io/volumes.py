"""Volumes for 3D bundles: NIfTI (``.nii``/``.nii.gz``), ``.npy`` ([D, H, W] or [C, D, H, W]) and
DICOM CT series (a folder whose files are one series), read as float32 [C, D, H, W] with their voxel
spacing (z, y, x) in mm where the source has one (NIfTI header; DICOM PixelSpacing and slice positions).

NIfTI arrays come in nibabel's voxel order (i, j, k) = (x, y, z); a volume here is [D, H, W] =
(z, y, x), the reverse, which is also the order the paper's 3D networks are given back their own
[X, Y, Z] in (:class:`attunet_deploy.models.oktay3d.Oktay3D`). Sizes are checked from the header
before any voxel is decoded (``ATTDEPLOY_MAX_IMAGE_FILE_MB``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError
from attunet_deploy.io.arrays import check_numeric, load_npy
from attunet_deploy.io.files import (
    NIFTI_EXT,
    file_sha256,
    is_dicom_file,
    list_image_files,
    reading,
    relative_name,
    suffix_of,
    walk_files,
)
from attunet_deploy.segmenter import Segmenter

VOLUME_EXT = (".npy", *NIFTI_EXT)


@dataclass
class Volume:
    """One volume: voxels [C, D, H, W] (raw intensities), spacing (z, y, x) mm if known, its name."""

    voxels: np.ndarray
    spacing: tuple[float, float, float] | None
    source: Path
    rel: str


def list_volumes(path: str | os.PathLike[str]) -> list[Path]:
    """Volumes at ``path`` (a file, or a folder searched recursively), sorted: volume files, and each
    folder that directly holds DICOM files (one series: the folder is the volume)."""
    root = Path(path)
    if root.is_dir():
        files = walk_files(root)
        found = {f for f in files if suffix_of(f) in VOLUME_EXT} | {f.parent for f in files if is_dicom_file(f)}
        if not found:
            raise InputError(f"no volumes in {root} (a 3D model reads {', '.join(VOLUME_EXT)} files, or one folder "
                             "of DICOM files per CT series)")
        return sorted(found)
    if root.is_file() and is_dicom_file(root):
        raise InputError(f"{root} is one DICOM file: give the folder of its series (a 3D model reads volumes)")
    return list_image_files(root, exts=VOLUME_EXT)


def series_files(folder: Path) -> list[Path]:
    """The DICOM files directly in a series folder (subfolders are volumes of their own)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom_file(f))


def volume_sha256(path: Path) -> str:
    """sha256 of a volume file, or of a series folder's DICOM files (names and contents)."""
    if not path.is_dir():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for f in series_files(path):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _nifti_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    import nibabel as nib

    limits.check_file_size(path, limits.IMAGE_FILE, "NIfTI file")
    img: Any = nib.load(str(path))  # a NIfTI image (nibabel types it as the generic file image)
    header: Any = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    check_numeric(np.dtype(header.get_data_dtype()), path)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{path}: NIfTI of shape {shape} is not a 3D volume")
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels * 4 > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, voxels * 4, limits.IMAGE_FILE)
    check_claimed_size(path, header, voxels)
    spacing = _nifti_spacing(path, [float(z) for z in header.get_zooms()[:3]])
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), spacing


#: gzip cannot expand data by more than about 1032:1; a .nii.gz claiming more is lying.
GZIP_MAX_RATIO = 1100


def check_claimed_size(path: Path, header: Any, voxels: int) -> None:
    """The voxel data a NIfTI header claims must fit in the file (or, gzipped, in what it can expand
    to) before a byte is allocated: a 416-byte file claiming 500^3 float64 is refused here."""
    claimed = voxels * np.dtype(header.get_data_dtype()).itemsize
    size = path.stat().st_size
    gz = path.name.lower().endswith(".gz")
    room = size * GZIP_MAX_RATIO if gz else size - int(header.get("vox_offset", 0) or 0)
    if claimed > room:
        raise InputError(f"{path}: the header claims {claimed:,} bytes of voxels but the file "
                         f"{'can expand to at most' if gz else 'holds'} {max(room, 0):,}: truncated or not a NIfTI "
                         "volume")


def _nifti_spacing(path: Path, zooms: list[float]) -> tuple[float, float, float] | None:
    """(z, y, x) mm from pixdim; None when the header leaves it zero (unknown); InputError for a
    spacing no CT volume has (non-finite, or outside the ranges DICOM series are held to)."""
    from attunet_deploy.io.dicom_series import PIXEL_SPACING_MM, SLICE_GAP_MM

    if len(zooms) < 3 or any(z == 0 for z in zooms):
        return None
    ranges = (PIXEL_SPACING_MM, PIXEL_SPACING_MM, SLICE_GAP_MM)
    for z, (lo, hi), axis in zip(zooms, ranges, "xyz"):
        if not (np.isfinite(z) and lo <= z <= hi):
            raise InputError(f"{path}: voxel size (pixdim) along {axis} is {z:g} mm, outside {lo:g}-{hi:g} mm: fix "
                             "the NIfTI header's pixdim")
    return (zooms[2], zooms[1], zooms[0])


def read_volume(path: Path, channels: int, root: Path | None = None) -> Volume:
    """One volume file as float32 [C, D, H, W]; InputError naming the file and the fix otherwise."""
    rel = relative_name(path, root) if root is not None else path.name
    with reading(path):
        if path.is_dir():
            from attunet_deploy.io.dicom_series import read_series_volume

            hu, spacing3, _ = read_series_volume(series_files(path), f"series folder {path}")
            arr, spacing = np.repeat(hu[None], channels, axis=0) if channels > 1 else hu, spacing3
        elif suffix_of(path) == ".npy":
            arr, spacing = np.asarray(load_npy(path), dtype=np.float32), None
        elif suffix_of(path) in NIFTI_EXT:
            arr, spacing = _nifti_volume(path)
        else:
            raise InputError(f"{path}: a volume is .npy, .nii or .nii.gz")
    if arr.ndim == 3 and channels == 1:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] != channels:
        raise InputError(f"{path}: volume of shape {arr.shape} is not [D, H, W] (one channel) or "
                         f"[{channels}, D, H, W]")
    if min(arr.shape[1:]) < 1 or not np.isfinite(arr).all():
        raise InputError(f"{path}: empty axis or NaN/Inf voxels")
    return Volume(np.ascontiguousarray(arr), spacing, path, rel)


def read_label_volume(path: Path, num_classes: int) -> np.ndarray:
    """A label volume as uint8 [D, H, W]: binary (> 0) for one output channel, class indices otherwise."""
    vol = read_volume(path, 1).voxels[0]
    if num_classes <= 2:
        return (vol > 0).astype(np.uint8)
    values = np.unique(vol)
    if values.min() < 0 or values.max() >= num_classes or not np.all(values == np.round(values)):
        raise InputError(f"label {path} holds values {values[:6].tolist()}: expected class indices "
                         f"0..{num_classes - 1}")
    return vol.astype(np.uint8)


def to_model_space(volume: Volume, segmenter: Segmenter) -> np.ndarray:
    """Normalised float32 [C, D, H, W], resampled to the bundle's spacing when both are known."""
    return segmenter.to_model_grid(segmenter.normalize(volume.voxels[None]), volume.spacing)[0]
