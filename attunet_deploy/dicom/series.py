"""CT instances: header scan, grouping by series, ordering along the slice normal, HU volumes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits
from ..errors import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


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


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def read_header(path: Path) -> Instance:
    """The header of one DICOM file (bounded read, pixel data skipped); InputError if unusable."""
    import pydicom

    size = limits.check_regular_file(path, "DICOM file")
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(path, size, limits.IMAGE_FILE)
    try:
        ds = pydicom.dcmread(str(path), defer_size=1024)  # large values (pixel data) are not loaded
    except Exception as exc:
        raise InputError(f"{path}: not a readable DICOM file ({str(exc)[:100]})") from None
    return header_of(ds, path, has_pixel_data(ds))


def has_pixel_data(ds: Any) -> bool:
    return any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def header_of(ds: Any, path: Path, has_pixels: bool) -> Instance:
    def text(tag: str) -> str:
        return str(getattr(ds, tag, "") or "").strip()

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
                    instance_number=number, has_pixels=has_pixels)


def unusable_reason(inst: Instance) -> str | None:
    """Why an instance cannot be segmented as a CT slice (None when it can)."""
    if inst.sop_class_uid != CT_IMAGE_STORAGE or inst.modality not in ("CT", ""):
        return f"not a CT image (SOP class {inst.sop_class_uid or '?'}, modality {inst.modality or '?'})"
    if not inst.has_pixels:
        return "no pixel data"
    if not inst.series_uid or not inst.sop_instance_uid:
        return "no SeriesInstanceUID/SOPInstanceUID"
    if inst.rows < 1 or inst.columns < 1:
        return "no Rows/Columns"
    if inst.rows * inst.columns > limits.IMAGE_PIXELS.bytes():
        return f"{inst.rows}x{inst.columns} is above {limits.IMAGE_PIXELS.describe()} ({limits.IMAGE_PIXELS.env})"
    return None


def dicom_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every file under ``paths`` (recursively), hidden files and folders excluded, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"input not found: {p}")
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        else:
            raise InputError(f"{p} is not a regular file or folder")
    return out


def scan(paths: Iterable[str | os.PathLike[str]]) -> tuple[dict[str, list[Instance]], list[tuple[Path, str]]]:
    """(series UID -> its CT instances, [(skipped file, reason)])."""
    series: dict[str, list[Instance]] = {}
    skipped: list[tuple[Path, str]] = []
    for f in dicom_files(paths):
        try:
            inst = read_header(f)
        except InputError as exc:
            skipped.append((f, str(exc)))
            continue
        reason = unusable_reason(inst)
        if reason:
            skipped.append((f, reason))
            continue
        series.setdefault(inst.series_uid, []).append(inst)
    return series, skipped


def geometry_problem(inst: Instance) -> str | None:
    """Why a CT slice cannot be placed in a volume or a SEG (None when it can): the Image Plane
    module's position and orientation are Type 1 in the CT Image IOD."""
    if inst.position is None:
        return "no usable ImagePositionPatient (3 numbers)"
    if inst.orientation is None:
        return "no usable ImageOrientationPatient (6 numbers)"
    o = np.asarray(inst.orientation)
    if np.linalg.norm(np.cross(o[:3], o[3:])) < 0.5:
        return "ImageOrientationPatient rows and columns are not orthogonal unit vectors"
    return None


def _names(paths: list[Path], limit: int = 3) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def dedupe_series(instances: list[Instance]) -> tuple[list[Instance], list[str]]:
    """One instance per SOP Instance UID and per slice position, or InputError naming the files.

    Files that repeat an instance byte for byte (a slice copied under another name) are dropped
    with a notice; two different files claiming one SOP Instance UID, two slices at one position,
    or a slice without its geometry would make an ambiguous SEG, so they are refused.
    """
    import hashlib

    uid = instances[0].series_uid if instances else "?"
    missing = [(i.path, r) for i in instances if (r := geometry_problem(i))]
    if missing:
        raise InputError(f"series {uid}: {missing[0][1]} in {_names([p for p, _ in missing])}: a SEG needs every "
                         "slice's position and orientation")
    notices: list[str] = []
    by_uid: dict[str, list[Instance]] = {}
    for inst in instances:
        by_uid.setdefault(inst.sop_instance_uid, []).append(inst)
    kept: list[Instance] = []
    for sop, group in by_uid.items():
        if len(group) > 1:
            digests = {hashlib.sha256(i.path.read_bytes()).hexdigest() for i in group}
            if len(digests) > 1:
                raise InputError(f"series {uid}: {len(group)} different files share SOP Instance UID {sop} "
                                 f"({_names([i.path for i in group])}): remove all but one")
            notices.append(f"{_names([i.path for i in group[1:]])} repeat{'s' if len(group) == 2 else ''} "
                           f"{group[0].path.name} byte for byte: used once")
        kept.append(group[0])
    normal = np.cross(np.asarray(kept[0].orientation[:3]), np.asarray(kept[0].orientation[3:]))  # type: ignore[index]
    at: dict[float, list[Instance]] = {}
    for inst in kept:
        at.setdefault(round(float(np.dot(np.asarray(inst.position), normal)), 3), []).append(inst)
    clash = next((g for g in at.values() if len(g) > 1), None)
    if clash is not None:
        raise InputError(f"series {uid}: {_names([i.path for i in clash])} lie at one slice position: a volume has one "
                         "slice per position; remove the duplicate")
    return kept, notices


def order_slices(instances: list[Instance]) -> list[Instance]:
    """Slices sorted along the slice normal (ImagePositionPatient . (row x column direction));
    by InstanceNumber where positions or orientations are missing."""
    sizes = {(i.rows, i.columns) for i in instances}
    if len(sizes) > 1:
        raise InputError(f"series {instances[0].series_uid} mixes image sizes {sorted(sizes)}: one size per series")
    orients = [i.orientation for i in instances]
    if all(o is not None for o in orients) and all(i.position is not None for i in instances):
        first = np.asarray(orients[0])
        if any(not np.allclose(np.asarray(o), first, atol=1e-3) for o in orients):
            raise InputError(f"series {instances[0].series_uid} mixes slice orientations: not one volume")
        normal = np.cross(first[:3], first[3:])
        return sorted(instances, key=lambda i: (float(np.dot(np.asarray(i.position), normal)), i.instance_number))
    return sorted(instances, key=lambda i: (i.instance_number, i.path.name))


def decode_hu(ds: Any, where: object) -> np.ndarray:
    """One CT slice's pixels in HU (rescale slope/intercept applied), float32 [H, W]."""
    try:
        px = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise InputError(f"{where}: cannot decode pixel data ({str(exc)[:120]})") from None
    if px.ndim != 2:
        raise InputError(f"{where}: expected one 2D frame, got pixel data of shape {px.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return px * np.float32(slope) + np.float32(intercept)


def load_volume(instances: list[Instance]) -> tuple[list[Any], np.ndarray]:
    """(full datasets, HU volume float32 [N, H, W]) of ordered instances; rescale applied."""
    import pydicom

    datasets = []
    slices = []
    for inst in instances:
        try:
            ds = pydicom.dcmread(str(inst.path))
        except Exception as exc:
            raise InputError(f"{inst.path}: not a readable DICOM file ({str(exc)[:120]})") from None
        slices.append(decode_hu(ds, inst.path))
        datasets.append(ds)
    return datasets, np.stack(slices).astype(np.float32)


def segment_volume(runner: Any, hu: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 masks [N, H, W] of an HU volume, ``batch`` slices per call (the runner normalises)."""
    channels = runner.channels
    out = []
    for s in range(0, len(hu), batch):
        x = hu[s:s + batch, None]
        if channels > 1:
            x = np.repeat(x, channels, axis=1)
        out.append(runner.segment(x))
    return np.concatenate(out).astype(np.uint8)
