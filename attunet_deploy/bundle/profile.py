"""The input profile: what the images a bundle was verified (and calibrated) on looked like, recorded
by export and quantize in the manifest's ``input_profile``, so that a result from images unlike them
can be flagged for review (``attunet_deploy/qa.py``).

Ranges are (lowest, highest) over the images; None where the images did not say (a ``.npy`` file
has no pixel spacing). Intensities are in the images' raw units (HU for CT), as percentiles of each
image's pixels. Segment sizes are per class, in ml for volumes or mm² per slice for 2D images, and
only recorded where the pixel spacing was known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

Range = tuple[float, float]


def _range(value: Any) -> Range | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        lo, hi = float(value[0]), float(value[1])
        return (lo, hi) if lo <= hi else None
    return None


def widen(a: Range | None, b: Range | None) -> Range | None:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), max(a[1], b[1])


@dataclass(frozen=True)
class InputProfile:
    """What the verified images looked like (see the module)."""

    images: int = 0
    pixel_spacing_mm: Range | None = None
    slice_thickness_mm: Range | None = None
    fov_mm: Range | None = None
    #: each image's 1st, 50th and 99th intensity percentile, as ranges over the images
    p1: Range | None = None
    p50: Range | None = None
    p99: Range | None = None
    orientation: str = "axial"
    #: class -> size range (``size_unit``: "ml" per volume, "mm2" per slice)
    segment_size: Mapping[int, Range] = field(default_factory=dict)
    size_unit: str = "ml"
    #: most connected components of one class in one golden image or volume
    components_max: int | None = None
    source: str = ""

    @property
    def recorded(self) -> bool:
        return self.images > 0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"images": self.images, "orientation": self.orientation, "source": self.source,
                                  "size_unit": self.size_unit}
        for key in ("pixel_spacing_mm", "slice_thickness_mm", "fov_mm", "p1", "p50", "p99"):
            value = getattr(self, key)
            if value is not None:
                out[key] = [round(value[0], 4), round(value[1], 4)]
        if self.segment_size:
            out["segment_size"] = {str(c): [round(r[0], 4), round(r[1], 4)] for c, r in self.segment_size.items()}
        if self.components_max is not None:
            out["components_max"] = self.components_max
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> InputProfile:
        """The recorded profile; a value of the wrong shape reads as unknown (it only flags results)."""
        if not isinstance(d, Mapping):
            return cls()
        sizes = d.get("segment_size")
        seg: dict[int, Range] = {}
        if isinstance(sizes, Mapping):
            for k, v in sizes.items():
                r = _range(v)
                if str(k).isdigit() and r is not None:
                    seg[int(k)] = r
        images, comps = d.get("images"), d.get("components_max")
        orientation = d.get("orientation")
        return cls(images if isinstance(images, int) and not isinstance(images, bool) and images >= 0 else 0,
                   _range(d.get("pixel_spacing_mm")), _range(d.get("slice_thickness_mm")), _range(d.get("fov_mm")),
                   _range(d.get("p1")), _range(d.get("p50")), _range(d.get("p99")),
                   orientation if orientation in ("axial", "coronal", "sagittal") else "axial", seg,
                   "mm2" if d.get("size_unit") == "mm2" else "ml",
                   comps if isinstance(comps, int) and not isinstance(comps, bool) and comps >= 0 else None,
                   str(d.get("source", ""))[:200])

    def merged(self, other: InputProfile) -> InputProfile:
        """This profile widened by ``other``'s ranges (e.g. the calibration images')."""
        if not other.recorded:
            return self
        if not self.recorded:
            return other
        again = other.source and other.source in self.source.split("; ")  # quantized again on the same set
        return replace(self, images=self.images + (0 if again else other.images),
                       pixel_spacing_mm=widen(self.pixel_spacing_mm, other.pixel_spacing_mm),
                       slice_thickness_mm=widen(self.slice_thickness_mm, other.slice_thickness_mm),
                       fov_mm=widen(self.fov_mm, other.fov_mm), p1=widen(self.p1, other.p1),
                       p50=widen(self.p50, other.p50), p99=widen(self.p99, other.p99),
                       source=self.source if again else f"{self.source}; {other.source}"[:200])
