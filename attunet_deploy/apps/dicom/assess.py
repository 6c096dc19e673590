"""A CT series before and after segmentation, as ``predict --dicom-seg`` and the node both judge it:
the acceptance gate's verdict (``gate.py``) before any work, the QA flag (``attunet_deploy/qa.py``) after."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.gate import Gate, SeriesFacts, Verdict, series_z
from attunet_deploy.apps.dicom.seg import SegNaming
from attunet_deploy.bundle import Bundle
from attunet_deploy.io.dicom import Instance
from attunet_deploy.qa import MaskTally, QaResult, SeriesFeatures, assess, series_percentiles


def judge_series(gate: Gate, bundle: Bundle, ordered: list[Instance], header: Any) -> Verdict:
    """The gate's verdict on a series (its first instance's header, its slices in order)."""
    model_z = bundle.spacing[0] if bundle.spacing is not None else None
    return gate.decide(SeriesFacts.of(header, len(ordered)), model_z, series_z(ordered))


def features(bundle: Bundle, ordered: list[Instance], header: Any,
             per_slice: Sequence[tuple[float, float, float]], forced: Sequence[str] = ()) -> SeriesFeatures:
    """What QA compares with the bundle's input profile."""
    first = ordered[0]
    gap = series_z(ordered)
    try:
        thickness = float(getattr(header, "SliceThickness", 0) or 0) or gap
    except (TypeError, ValueError):
        thickness = gap
    ps = first.pixel_spacing
    p = series_percentiles(per_slice)
    volume = bundle.spatial_dims == 3
    voxel = None
    if ps is not None:
        voxel = ps[0] * ps[1] * (gap or thickness or 1.0) if volume else ps[0] * ps[1]
    return SeriesFeatures(
        pixel_spacing=ps, slice_thickness=gap if volume else thickness,
        fov_mm=max(first.rows * ps[0], first.columns * ps[1]) if ps is not None else None,
        p1=p[0] if p else None, p50=p[1] if p else None, p99=p[2] if p else None,
        model_spacing=bundle.spacing if volume else None, voxel_mm3=voxel, volume=volume, forced=tuple(forced))


def assess_series(bundle: Bundle, naming: SegNaming, f: SeriesFeatures, masks: np.ndarray,
                  tally: MaskTally | None) -> QaResult:
    return assess(bundle.input_profile, f, masks, tally, naming.labels())


def forced_reason(verdict: Verdict) -> str:
    return f"segmented although the acceptance gate refused it ({verdict.rule}: {verdict.reason})"
