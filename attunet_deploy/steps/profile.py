"""The input profile export and quantize record (``bundle/profile.py``): measured from the raw images
of the golden set (and the calibration images), with the reference's masks of the golden set for
segment sizes and fragments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attunet_deploy.bundle.profile import InputProfile, Range
from attunet_deploy.qa import percentiles
from attunet_deploy.segmenter import Segmenter

#: The demo phantoms' nominal acquisition: demo/ctseries.py writes them at 1 mm pixels, 2.5 mm apart.
DEMO_PIXEL_MM, DEMO_THICKNESS_MM = 1.0, 2.5


def _span(values: Sequence[float]) -> Range | None:
    return (float(min(values)), float(max(values))) if values else None


def measure(raws: Sequence[np.ndarray], masks: Sequence[np.ndarray], segmenter: Segmenter, *,
            pixel_spacing: Sequence[tuple[float, float]] = (), slice_thickness: Sequence[float] = (),
            volume: bool = False, voxel_mm3: float | None = None, source: str = "") -> InputProfile:
    """The profile of raw images ([C, H, W]) or volumes ([C, D, H, W]) and the reference's masks of
    them ([H, W] / [D, H, W]); spacings where the images said them; ``voxel_mm3`` (pixel area in 2D)
    sizes the segments (None: sizes not recorded)."""
    from attunet_deploy.components import count

    if not raws:
        return InputProfile()
    stats = [percentiles(r) for r in raws]
    classes = segmenter.spec.input.classes
    comps = [n for m in masks for n in count(m, classes).values()]
    sizes: dict[int, list[float]] = {}
    if voxel_mm3 is not None:
        for m in masks:
            for c in classes:
                n = float((m == c).sum())
                if n:
                    sizes.setdefault(c, []).append(n * voxel_mm3 / (1000.0 if volume else 1.0))
    fov = [max(r.shape[-2] * ps[0], r.shape[-1] * ps[1]) for r, ps in zip(raws, pixel_spacing)] \
        if len(pixel_spacing) == len(raws) else []
    return InputProfile(
        images=len(raws), pixel_spacing_mm=_span([max(ps) for ps in pixel_spacing]),
        slice_thickness_mm=_span(list(slice_thickness)), fov_mm=_span(fov),
        p1=_span([s[0] for s in stats]), p50=_span([s[1] for s in stats]), p99=_span([s[2] for s in stats]),
        segment_size={c: (min(v), max(v)) for c, v in sizes.items()}, size_unit="ml" if volume else "mm2",
        components_max=max(comps) if comps else None, source=source)


def of_records(records: Sequence[Any], masks: Sequence[np.ndarray], segmenter: Segmenter, source: str
               ) -> InputProfile:
    """The profile of 2D image records (raw [C, H, W] with their readers' spacing where they had one)."""
    spacings = [tuple(r.meta["pixel_spacing"]) for r in records if "pixel_spacing" in r.meta]
    thickness = [float(r.meta["slice_thickness"]) for r in records if "slice_thickness" in r.meta]
    known = len(spacings) == len(records)
    area = float(np.median([a * b for a, b in spacings])) if known and spacings else None
    return measure([r.pixels for r in records], masks, segmenter, pixel_spacing=spacings if known else (),
                   slice_thickness=thickness, voxel_mm3=area, source=source)


def demo_profile(segmenter: Segmenter, raws: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> InputProfile:
    """The demos' profile: their phantoms at the nominal acquisition the demo's CT series are written
    with (2D: 1 mm pixels, 2.5 mm slices; 3D: the demo's own spacing). The 2D phantoms fill the frame
    at any size, so no field of view or physical segment size is claimed for them."""
    spacing = segmenter.spec.spacing
    if spacing is not None:  # the 3D demo: volumes at the model's spacing
        return measure(raws, masks, segmenter, pixel_spacing=[(spacing[1], spacing[2])] * len(raws),
                       slice_thickness=[spacing[0]] * len(raws), volume=True,
                       voxel_mm3=float(np.prod(spacing)), source="demo phantom volumes at the demo's spacing")
    profile = measure(raws, masks, segmenter, slice_thickness=[DEMO_THICKNESS_MM] * len(raws),
                      source="demo phantoms (nominal 1 mm pixels, 2.5 mm slices)")
    from dataclasses import replace

    return replace(profile, pixel_spacing_mm=(DEMO_PIXEL_MM, DEMO_PIXEL_MM))
