"""The one DICOM reader (calibration images, predict and the DICOM node): bounded header reads,
CT instance headers, pixel data in output units (pydicom's rescale), volumes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError
from attunet_deploy.io.arrays import ImageRecord, match_channels
from attunet_deploy.io.files import walk_files

#: CT Image Storage, the SOP class the node accepts (equal to ``pydicom.uid.CTImageStorage``; kept as a
#: literal so that importing this module does not need pydicom).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class Instance:
    """What a CT instance's header says (no pixel data read)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str
    rows: int
    columns: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    instance_number: int
    has_pixels: bool
    pixel_spacing: tuple[float, float] | None = None  # (row, column) mm


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def read_header(path: Path) -> Instance:
    """The header of one DICOM file (bounded read, pixel data skipped); InputError if unusable."""
    ds = dicom_header(path)
    return header_of(ds, path, has_pixel_data(ds))


def has_pixel_data(ds: Any) -> bool:
    return any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def text_of(ds: Any, keyword: str) -> str:
    """A string attribute without its padding (spaces; NULs for UIDs); "" when absent or malformed
    (a malformed element raises on access)."""
    try:
        return str(getattr(ds, keyword, "") or "").strip("\0 \t\r\n")
    except Exception:
        return ""


def header_of(ds: Any, path: Path, has_pixels: bool) -> Instance:
    def text(keyword: str) -> str:
        return text_of(ds, keyword)

    try:
        number = int(getattr(ds, "InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return Instance(path=path, sop_instance_uid=text("SOPInstanceUID"), sop_class_uid=text("SOPClassUID"),
                    series_uid=text("SeriesInstanceUID"), study_uid=text("StudyInstanceUID"),
                    modality=text("Modality"), rows=int(getattr(ds, "Rows", 0) or 0),
                    columns=int(getattr(ds, "Columns", 0) or 0),
                    position=_floats(getattr(ds, "ImagePositionPatient", None), 3),  # type: ignore[arg-type]
                    orientation=_floats(getattr(ds, "ImageOrientationPatient", None), 6),
                    instance_number=number, has_pixels=has_pixels,
                    pixel_spacing=_positive(_floats(getattr(ds, "PixelSpacing", None), 2)))  # type: ignore[arg-type]


def _positive(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return values if values is not None and all(v > 0 for v in values) else None


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def rescaled_pixels(ds: Any, where: object) -> np.ndarray:
    """Pixel data in output units (HU for CT), float32, any frame layout: pydicom's
    ``apply_rescale`` (Modality LUT, or slope and intercept). An empty or zero slope is read as 1,
    an empty intercept as 0, as scanners that omit them mean."""
    try:
        px = ds.pixel_array
    except Exception as exc:
        raise InputError(f"{where}: cannot decode pixel data ({str(exc)[:120]})") from None
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_rescale

        return np.asarray(apply_rescale(px, ds), dtype=np.float32)
    slope, intercept = _finite(getattr(ds, "RescaleSlope", None)), _finite(getattr(ds, "RescaleIntercept", None))
    # A slope other than 1 in float64 as pydicom's apply_rescale computes it, then float32. A slope of
    # 1 (CT's usual case) skips the float64 temporary: stored values and integer intercepts are exact
    # in float32.
    if slope and slope != 1.0:
        return (px * slope + (intercept or 0.0)).astype(np.float32)
    out = px.astype(np.float32)
    if intercept:
        out += np.float32(intercept)
    return out


def read_dataset(path: Path) -> Any:
    """The whole dataset of one DICOM file (its header was size-checked first); InputError if unreadable."""
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a readable DICOM file ({str(exc)[:120]})") from None


def decode_hu(ds: Any, where: object) -> np.ndarray:
    """One CT slice's pixels in HU (rescale slope/intercept applied), float32 [H, W]."""
    px = rescaled_pixels(ds, where)
    if px.ndim != 2:
        raise InputError(f"{where}: expected one 2D frame, got pixel data of shape {px.shape}")
    return px


def load_volume(instances: list[Instance]) -> tuple[list[Any], np.ndarray]:
    """(full datasets, HU volume float32 [N, H, W]) of ordered instances; rescale applied."""
    datasets = []
    slices = []
    for inst in instances:
        ds = read_dataset(inst.path)
        slices.append(decode_hu(ds, inst.path))
        datasets.append(ds)
    return datasets, np.stack(slices).astype(np.float32)


def dicom_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every file under ``paths`` (recursively), hidden files and folders excluded, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"input not found: {p}")
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += walk_files(p)
        else:
            raise InputError(f"{p} is not a regular file or folder")
    return out


def dicom_header(path: Path) -> Any:
    """A DICOM dataset with large values (pixel data) deferred, after size checks (raises InputError)."""
    import pydicom

    limits.check_file_size(path, limits.IMAGE_FILE, "DICOM file")
    try:
        return pydicom.dcmread(str(path), defer_size=1024)  # large values (pixel data) are not loaded
    except Exception as exc:
        raise InputError(f"{path}: not a readable DICOM file ({str(exc)[:120]})") from None


def read_dicom_images(path: Path, channels: int, rel: str) -> list[ImageRecord]:
    """Every frame of one DICOM file as an image record (header and pixel count checked first)."""
    head = dicom_header(path)
    rows, cols = int(getattr(head, "Rows", 0) or 0), int(getattr(head, "Columns", 0) or 0)
    frames_n = int(getattr(head, "NumberOfFrames", 1) or 1)
    limits.check_pixels(rows, cols, path)
    if rows * cols * frames_n * 4 > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, rows * cols * frames_n * 4, limits.IMAGE_FILE)
    if not has_pixel_data(head):
        raise InputError(f"{path}: DICOM file has no pixel data")
    pixels = rescaled_pixels(head, path)  # the deferred pixel data is read now: one parse per file
    samples = int(getattr(head, "SamplesPerPixel", 1) or 1)
    frames = pixels if (pixels.ndim == 3 and samples == 1) or pixels.ndim == 4 else pixels[None]
    meta: dict[str, Any] = {"multi": len(frames) > 1}
    spacing = _positive(_floats(getattr(head, "PixelSpacing", None), 2))  # type: ignore[arg-type]
    if spacing is not None:
        meta["pixel_spacing"] = spacing
    thickness = _finite(getattr(head, "SliceThickness", None))
    if thickness is not None and thickness > 0:
        meta["slice_thickness"] = thickness
    return [ImageRecord(match_channels(f, channels, path), path, i, meta, rel) for i, f in enumerate(frames)]
