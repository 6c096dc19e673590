"""What a segmented series is answered with: ``--outputs seg,rtstruct,sc,sr`` (default ``seg``).

- ``seg``: DICOM Segmentation (``seg.py``), for viewers that show SEG;
- ``rtstruct``: RT Structure Set (``rtstruct.py``), for radiotherapy planning systems;
- ``sc``: a Secondary Capture overlay series (``overlay.py``), for any PACS viewer;
- ``sr``: a TID 1500 Comprehensive 3D SR (``sr.py``) with each segment's volume and the QA status; it
  references the SEG's segments, so it needs ``seg``.

Every object keeps the source study (patient and study attributes, StudyInstanceUID), so a PACS
files it under the CT's study.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.seg import Provenance, SegNaming, build_seg, write_dataset
from attunet_deploy.errors import InputError
from attunet_deploy.qa import QaResult

OUTPUT_KINDS = ("seg", "rtstruct", "sc", "sr")


def parse_outputs(text: str) -> tuple[str, ...]:
    """``seg,rtstruct,sc,sr`` -> the kinds in that order; InputError for an unknown kind or sr without seg."""
    kinds = [k.strip().lower() for k in str(text).split(",") if k.strip()]
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad or not kinds:
        raise InputError(f"output type {', '.join(bad) or 'none'!r}: choose from {', '.join(OUTPUT_KINDS)} "
                         "(comma-separated)", field="outputs")
    if "sr" in kinds and "seg" not in kinds:
        raise InputError("an SR reports the SEG's segments: add seg (e.g. seg,sr)", field="outputs")
    return tuple(k for k in OUTPUT_KINDS if k in kinds)


def kind_series_uid(base: str, kind: str) -> str:
    """A stable series UID per output kind, derived from the SEG series of a source series (so every
    result of one source series is one series per kind, across batches and restarts)."""
    if kind == "seg":
        return base
    return "2.25." + str(int(hashlib.sha256(f"{base}/{kind}".encode()).hexdigest()[:30], 16))


@dataclass(frozen=True)
class SeriesResult:
    """A segmented series, as every writer needs it: source datasets (slice order), masks, how the
    segments are named, who made them, the QA flag, the voxel volume (mm³), and the CT window."""

    datasets: list[Any]
    masks: np.ndarray
    naming: SegNaming
    provenance: Provenance
    qa: QaResult
    voxel_mm3: float
    window: tuple[float, float]


def voxel_mm3(datasets: list[Any], slice_gap: float | None) -> float:
    """PixelSpacing x the slice spacing (the gap between positions; SliceThickness where unknown)."""
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)
    z = slice_gap or float(getattr(datasets[0], "SliceThickness", 0) or 0) or 1.0
    return dr * dc * z


def write_outputs(result: SeriesResult, kinds: tuple[str, ...], target: Callable[[str, int], Path], *,
                  series_uid: str, instance_number: int = 1,
                  hu: Callable[[], list[np.ndarray]] | None = None) -> dict[str, list[Path]]:
    """Write each requested kind; ``target(kind, k)`` names the k-th file of a kind. ``hu`` gives the
    slices' HU (read again only for the overlay). Returns kind -> paths written."""
    written: dict[str, list[Path]] = {}
    seg = None
    if "seg" in kinds:
        seg = build_seg(result.datasets, result.masks, result.naming, result.provenance,
                        series_instance_uid=kind_series_uid(series_uid, "seg"), instance_number=instance_number)
        written["seg"] = [_write(seg, target("seg", 0))]
    if "rtstruct" in kinds:
        from attunet_deploy.apps.dicom.rtstruct import build_rtstruct

        rt = build_rtstruct(result.datasets, result.masks, result.naming, result.provenance,
                            series_instance_uid=kind_series_uid(series_uid, "rtstruct"),
                            instance_number=instance_number)
        written["rtstruct"] = [_write(rt, target("rtstruct", 0))]
    if "sc" in kinds:
        from attunet_deploy.apps.dicom.overlay import build_overlays

        if hu is None:
            raise InputError("internal: the overlay needs the slices' pixels")
        images = build_overlays(result.datasets, hu(), result.masks, result.naming, result.provenance,
                                window=result.window, series_instance_uid=kind_series_uid(series_uid, "sc"))
        written["sc"] = [_write(im, target("sc", k)) for k, im in enumerate(images)]
    if "sr" in kinds and seg is not None:
        from attunet_deploy.apps.dicom.sr import build_sr

        sr = build_sr(seg, result.datasets, result.masks, result.naming, result.provenance, result.qa,
                      voxel_mm3=result.voxel_mm3, series_instance_uid=kind_series_uid(series_uid, "sr"),
                      instance_number=instance_number)
        written["sr"] = [_write(sr, target("sr", 0))]
    return written


def _write(ds: Any, path: Path) -> Path:
    write_dataset(ds, path)
    return path
