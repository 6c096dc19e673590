"""CT series as volumes: grouping instances by series, what makes one unusable, duplicates,
ordering along the slice normal, and the volume's geometry (voxel spacing from PixelSpacing and the
distance between ImagePositionPatient values; irregular spacing and gantry tilt refused with the
reason). Shared by volume inputs of 3D bundles, ``predict --dicom-seg`` and the DICOM node.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from attunet_deploy import limits
from attunet_deploy.errors import InputError
from attunet_deploy.io.dicom import CT_IMAGE_STORAGE, Instance, dicom_files, load_volume, read_header

#: Largest deviation of one slice gap from the median gap, relative (1 %: scanners write positions
#: with 0.01 mm precision; reconstructions with skipped or overlapping slices differ by far more).
SPACING_TOLERANCE = 0.01
#: Largest angle between the slice normal and the line through the slice positions (gantry tilt).
TILT_TOLERANCE_DEG = 0.5


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


#: ImageOrientationPatient's two direction cosines: each of unit length and at right angles, to
#: within this (6-decimal values written by scanners are within 1e-5; 0.01 is 0.6 degrees).
ORIENTATION_TOLERANCE = 0.01
#: Physical ranges a CT slice's pixel spacing and its series' slice gaps must lie in (mm): a 0.01 mm
#: pixel is a microscope's, a 50 mm gap no volume; outside them a header is wrong, and resampling it
#: to a model's grid would cost minutes or gigabytes.
PIXEL_SPACING_MM = (0.01, 50.0)
SLICE_GAP_MM = (0.1, 50.0)


def geometry_problem(inst: Instance) -> str | None:
    """Why a CT slice cannot be placed in a volume or a SEG (None when it can): the Image Plane
    module's position and orientation are Type 1 in the CT Image IOD, and must describe a plane."""
    if inst.position is None:
        return "no usable ImagePositionPatient (3 numbers)"
    if inst.orientation is None:
        return "no usable ImageOrientationPatient (6 numbers)"
    o = np.asarray(inst.orientation, dtype=np.float64)
    row, col = o[:3], o[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if any(abs(n - 1.0) > ORIENTATION_TOLERANCE for n in lengths):
        return (f"ImageOrientationPatient {[round(v, 4) for v in o.tolist()]}: its row and column directions have "
                f"lengths {lengths[0]:.3g} and {lengths[1]:.3g}, not 1 (direction cosines)")
    if abs(float(row @ col)) > ORIENTATION_TOLERANCE:
        angle = float(np.degrees(np.arccos(np.clip(row @ col / (lengths[0] * lengths[1]), -1, 1))))
        return (f"ImageOrientationPatient {[round(v, 4) for v in o.tolist()]}: its row and column directions are "
                f"{angle:.1f} degrees apart, not 90")
    if inst.pixel_spacing is not None and not all(PIXEL_SPACING_MM[0] <= v <= PIXEL_SPACING_MM[1]
                                                  for v in inst.pixel_spacing):
        return (f"PixelSpacing {[float(f'{v:.4g}') for v in inst.pixel_spacing]} mm is outside "
                f"{PIXEL_SPACING_MM[0]:g}-{PIXEL_SPACING_MM[1]:g} mm: not a CT slice's pixel")
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
        raise InputError(f"series {uid}: {missing[0][1]} in {_names([p for p, _ in missing])}: every slice must lie "
                         "in space (position, orientation, spacing) for a volume or a SEG")
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


def slice_gaps(instances: list[Instance]) -> list[float]:
    """Distances (mm) between neighbouring slices along their normal, in slice order (empty when
    positions or orientations are missing)."""
    if len(instances) < 2 or any(i.position is None or i.orientation is None for i in instances):
        return []
    o = np.asarray(instances[0].orientation)
    normal = np.cross(o[:3], o[3:])
    along = sorted(float(np.dot(np.asarray(i.position), normal)) for i in instances)
    return [b - a for a, b in itertools.pairwise(along)]


def series_spacing(ordered: list[Instance]) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) in mm of slices ordered along their normal; InputError naming the
    problem for a volume that is not a regular grid (irregular gaps, gantry tilt, missing PixelSpacing)."""
    uid = ordered[0].series_uid if ordered else "?"
    if any(i.pixel_spacing is None for i in ordered):
        raise InputError(f"series {uid}: a slice has no usable PixelSpacing (2 positive numbers): the volume's "
                         "voxel size is unknown")
    spacings = sorted({i.pixel_spacing for i in ordered if i.pixel_spacing is not None})
    if len(spacings) > 1:
        raise InputError(f"series {uid} mixes PixelSpacing values {spacings[:3]}: not one volume")
    row_mm, col_mm = spacings[0]
    if len(ordered) < 2:
        raise InputError(f"series {uid} has one slice: a 3D model needs a volume (several slices)")
    o = np.asarray(ordered[0].orientation)
    normal = np.cross(o[:3], o[3:])
    pos = np.asarray([i.position for i in ordered], dtype=np.float64)
    steps = np.diff(pos, axis=0)
    gaps = steps @ normal
    z = float(np.median(gaps))
    if z <= 0:
        raise InputError(f"series {uid}: slices do not advance along their normal")
    if not SLICE_GAP_MM[0] <= z <= SLICE_GAP_MM[1]:
        raise InputError(f"series {uid}: slices are {z:.4g} mm apart, outside {SLICE_GAP_MM[0]:g}-{SLICE_GAP_MM[1]:g} "
                         "mm: check ImagePositionPatient (a volume that far apart is not a CT series)")
    worst = float(np.max(np.abs(gaps - z)) / z)
    if worst > SPACING_TOLERANCE:
        raise InputError(f"series {uid}: slice gaps range {gaps.min():.3f}..{gaps.max():.3f} mm (median {z:.3f}): "
                         "not a regular volume (missing or overlapping slices?); send the complete series with "
                         "equal gaps")
    along = np.linalg.norm(steps, axis=1)
    cos = np.clip(np.abs(gaps) / np.maximum(along, 1e-9), 0.0, 1.0)
    tilt = float(np.degrees(np.arccos(cos.min())))
    if tilt > TILT_TOLERANCE_DEG:
        raise InputError(f"series {uid}: slice positions run {tilt:.1f} degrees off the slice normal (gantry tilt): "
                         "resample it to an untilted volume first (this tool does not correct tilt)")
    return (z, float(row_mm), float(col_mm))


def read_series_volume(paths: Iterable[str | os.PathLike[str]], what: str
                       ) -> tuple[np.ndarray, tuple[float, float, float], list[Instance]]:
    """(HU volume float32 [D, H, W] ordered along the slice normal, spacing (z, y, x) mm, the ordered
    instances) of the one CT series under ``paths``; InputError naming ``what`` otherwise."""
    series, skipped = scan(paths)
    if not series:
        reason = f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
        raise InputError(f"{what}: no CT series{reason}")
    if len(series) > 1:
        raise InputError(f"{what} holds {len(series)} CT series: one series per folder (a volume)")
    instances, _ = dedupe_series(next(iter(series.values())))
    ordered = order_slices(instances)
    spacing = series_spacing(ordered)
    rows, cols = ordered[0].rows, ordered[0].columns
    size = rows * cols * len(ordered) * 4
    if size > limits.IMAGE_FILE.bytes():
        raise limits.too_large(Path(what), size, limits.IMAGE_FILE)
    _, hu = load_volume(ordered)
    return hu, spacing, ordered
