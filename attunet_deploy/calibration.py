"""Read calibration and prediction images: .npy/.npz, PNG/TIFF/JPEG, DICOM, NIfTI.

Readers return raw intensities (DICOM with rescale slope/intercept applied, so HU for CT);
the bundle's normalisation is applied afterwards exactly as at run time
(:func:`attunet_deploy.preprocess.normalize`). Images of different sizes are fine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .preprocess import check_batch, normalize, pad_to_divisor

ARRAY_EXT = (".npy", ".npz")
RASTER_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
DICOM_EXT = (".dcm", ".dicom", ".ima")
NIFTI_EXT = (".nii", ".nii.gz")
SUPPORTED = ", ".join(ARRAY_EXT + RASTER_EXT + DICOM_EXT + NIFTI_EXT)


@dataclass
class ImageRecord:
    """One 2D image of ``channels`` channels as raw float32 [C, H, W], with where it came from."""

    pixels: np.ndarray
    source: Path
    index: int = 0  # slice/frame/array index inside the source file
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. NIfTI affine, for writing masks back

    @property
    def label(self) -> str:
        return f"{self.source.name}[{self.index}]" if self.meta.get("multi") else self.source.name


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom(path: Path) -> bool:
    if _suffix(path) in DICOM_EXT:
        return True
    if path.suffix:  # DICOM files often have no extension; anything else with one is not DICOM
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def list_image_files(path: str | os.PathLike[str]) -> list[Path]:
    """Supported files at ``path`` (a file, or a directory searched recursively), sorted."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image path not found: {p}")
    if p.is_file():
        return [p]
    files = [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")
             and (_suffix(f) in ARRAY_EXT + RASTER_EXT + NIFTI_EXT or _is_dicom(f))]
    if not files:
        raise InputError(f"no images in {p} (supported: {SUPPORTED}, or DICOM without extension)")
    return files


def _to_chw_list(arr: np.ndarray, channels: int, source: Path) -> list[np.ndarray]:
    """Split an array into [C, H, W] images: accepts [N,C,H,W], [C,H,W], [N,H,W] (C=1), [H,W]."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{source}: array dtype {arr.dtype} is not numeric")
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape[0] == channels else arr[:, None] if channels == 1 else None
        if arr is None:
            raise InputError(f"{source}: a 3D array must be [C={channels}, H, W]")
    if arr.ndim != 4 or arr.shape[1] != channels:
        raise InputError(f"{source}: array of shape {np.shape(arr)} is not [N, {channels}, H, W], "
                         f"[{channels}, H, W] or [H, W]")
    return [a.astype(np.float32) for a in arr]


def _match_channels(img: np.ndarray, channels: int, source: Path) -> np.ndarray:
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


def read_file(path: Path, channels: int) -> list[ImageRecord]:
    """All 2D images in one file, as raw intensities."""
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            return [ImageRecord(a, path, i, {"multi": True}) for i, a in
                    enumerate(_to_chw_list(np.load(path, allow_pickle=False), channels, path))]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                key = "images" if "images" in data else data.files[0] if data.files else None
                if key is None:
                    raise InputError(f"{path}: empty .npz")
                arrays = _to_chw_list(data[key], channels, path)
            return [ImageRecord(a, path, i, {"multi": True}) for i, a in enumerate(arrays)]
        if suffix in RASTER_EXT:
            return [_read_raster(path, channels)]
        if suffix in NIFTI_EXT:
            return _read_nifti(path, channels)
        if _is_dicom(path):
            return _read_dicom(path, channels)
    except InputError:
        raise
    except ImportError as exc:
        raise InputError(f"{path}: reading {suffix or 'DICOM'} needs {exc.name}: "
                         "pip install 'attunet-deploy[medical]'") from exc
    except Exception as exc:
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                         ) from exc
    raise InputError(f"{path}: unsupported file type (supported: {SUPPORTED})")


def _read_raster(path: Path, channels: int) -> ImageRecord:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "LA", "PA", "1"):
            im = im.convert("RGBA" if "A" in im.mode else "L")
        arr = np.asarray(im, dtype=np.float32)
    return ImageRecord(_match_channels(arr, channels, path), path)


def _read_dicom(path: Path, channels: int) -> list[ImageRecord]:
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    frames = pixels if (pixels.ndim == 3 and samples == 1) or pixels.ndim == 4 else pixels[None]
    meta = {"multi": len(frames) > 1, "rescale": [slope, intercept]}
    return [ImageRecord(_match_channels(f, channels, path), path, i, meta) for i, f in enumerate(frames)]


def _read_nifti(path: Path, channels: int) -> list[ImageRecord]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(f"{path}: NIfTI with {data.ndim} dimensions; 2D images or 3D volumes only")
    meta = {"multi": data.shape[2] > 1, "affine": np.asarray(img.affine), "nifti_shape": data.shape}
    return [ImageRecord(_match_channels(data[:, :, k], channels, path), path, k, meta) for k in range(data.shape[2])]


def iter_images(path: str | os.PathLike[str], channels: int) -> Iterator[ImageRecord]:
    for f in list_image_files(path):
        yield from read_file(f, channels)


def load_images(path: str | os.PathLike[str], channels: int, max_samples: int | None = None) -> list[ImageRecord]:
    """Every image at ``path``; with ``max_samples``, an evenly spaced deterministic subset."""
    records = list(iter_images(path, channels))
    if not records:
        raise InputError(f"no images found in {path}")
    if max_samples is not None:
        if max_samples < 1:
            raise InputError("--max-samples must be >= 1")
        if len(records) > max_samples:
            idx = np.unique(np.linspace(0, len(records) - 1, max_samples).round().astype(int))
            records = [records[i] for i in idx]
    return records


def model_inputs(records: list[ImageRecord], preprocessing: dict[str, Any], divisor: int) -> list[np.ndarray]:
    """Raw records -> normalised, padded float32 [1, C, H, W] arrays, one per image."""
    out = []
    for rec in records:
        x = check_batch(rec.pixels[None], rec.pixels.shape[0], name=rec.label)
        x = normalize(x, preprocessing)
        out.append(pad_to_divisor(x, divisor)[0])
    return out
