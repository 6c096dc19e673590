"""When a reader should not trust a result: the QA flag of a segmented series (``ok`` or ``review``
with the reasons), from how the input compares with the images the bundle was verified on (its
``input_profile``), how uncertain the model was, how fragmented the masks are and how large.

Every threshold is stated once, here, and each reason names the figure and the range it left.
numpy only; connected components through :mod:`attunet_deploy.components`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attunet_deploy.bundle.profile import InputProfile, Range
from attunet_deploy.bundle.spec import Postprocessing

#: A spacing is off when outside [lowest / 1.5, highest x 1.5] of the verified images (2D); a 3D
#: model resamples to its own spacing, so only a spacing coarser than 1.5 x the model's is off.
SPACING_FACTOR = 1.5
#: The 1st and 99th intensity percentiles (air and dense tissue in CT) may leave the verified
#: images' range by this much (raw units, HU) before a series is flagged: +1000 HU leaves it at once.
INTENSITY_MARGIN = 150.0
#: A voxel is uncertain when its probability is within this of the threshold (sigmoid), or the gap
#: between its two most likely classes is below twice this (argmax).
UNCERTAIN_BAND = 0.25
#: Review when more than this share of the segmented region (foreground or uncertain) is uncertain.
UNCERTAIN_SHARE = 0.25
#: Review when a class has more components than max(COMPONENTS_FLOOR, COMPONENTS_FACTOR x the most
#: seen in one golden case).
COMPONENTS_FLOOR, COMPONENTS_FACTOR = 4, 2
#: Review when a segment's size leaves [smallest / SIZE_FACTOR, largest x SIZE_FACTOR] of the golden set.
SIZE_FACTOR = 3.0


@dataclass(frozen=True)
class QaResult:
    """``ok``, or ``review`` with the reasons, in words a reader can act on."""

    status: str = "ok"
    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, reasons: Sequence[str]) -> QaResult:
        return cls("review" if reasons else "ok", tuple(reasons))

    def to_dict(self) -> dict[str, object]:
        return {"status": self.status, "reasons": list(self.reasons)}


@dataclass
class MaskTally:
    """Uncertain and foreground voxels of a stream of logits (fed by the Segmenter's ``observe``)."""

    post: Postprocessing
    foreground: int = 0
    uncertain: int = 0
    region: int = 0  # foreground or uncertain

    def add(self, logits: np.ndarray) -> None:
        """Count a batch of logits [N, K, *spatial]."""
        for counts in self.counts(logits):
            self.add_counts(counts)

    def add_counts(self, counts: tuple[int, int, int]) -> None:
        """Add one image's (foreground, uncertain, region) counts (kept from an earlier batch)."""
        self.foreground += counts[0]
        self.uncertain += counts[1]
        self.region += counts[2]

    def counts(self, logits: np.ndarray) -> list[tuple[int, int, int]]:
        """(foreground, uncertain, region) voxels of each image of a batch of logits [N, K, *spatial]."""
        z = np.asarray(logits, dtype=np.float32)
        if self.post.kind == "sigmoid_threshold":
            t = self.post.threshold
            lo = math.log(max(t - UNCERTAIN_BAND, 1e-6) / (1 - max(t - UNCERTAIN_BAND, 1e-6)))
            hi = math.log(min(t + UNCERTAIN_BAND, 1 - 1e-6) / (1 - min(t + UNCERTAIN_BAND, 1 - 1e-6)))
            zz = z[:, 0]
            fg = zz > math.log(t / (1 - t))
            unsure = (zz > lo) & (zz < hi)
        else:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            top2 = np.sort(p, axis=1)[:, -2:]
            fg = np.argmax(z, axis=1) > 0
            unsure = (top2[:, 1] - top2[:, 0]) < 2 * UNCERTAIN_BAND
        region = fg | unsure
        return [(int(f.sum()), int(u.sum()), int(r.sum())) for f, u, r in zip(fg, unsure, region)]

    @property
    def share(self) -> float:
        return self.uncertain / self.region if self.region else 0.0


@dataclass(frozen=True)
class SeriesFeatures:
    """What QA compares with the input profile: spacing (mm), field of view (mm), intensity
    percentiles (raw units), and whether the model is 3D with its own spacing."""

    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    fov_mm: float | None = None
    p1: float | None = None
    p50: float | None = None
    p99: float | None = None
    model_spacing: tuple[float, float, float] | None = None  # a 3D model's own (it resamples)
    voxel_mm3: float | None = None  # of the masks QA measures
    volume: bool = False  # masks are one volume (sizes in ml) rather than slices (mm² per slice)
    forced: tuple[str, ...] = field(default=())  # gate refusals overridden by --force


def percentiles(raw: np.ndarray) -> tuple[float, float, float]:
    """The 1st, 50th and 99th percentile of an image's or volume's raw values."""
    p = np.percentile(np.asarray(raw, dtype=np.float32), [1, 50, 99])
    return float(p[0]), float(p[1]), float(p[2])


def slice_percentiles(hu: np.ndarray) -> tuple[float, float, float]:
    """:func:`percentiles` of one slice from every other pixel (a quarter of the work, the same figures
    to within a few HU on CT)."""
    return percentiles(np.asarray(hu)[::2, ::2])


def series_percentiles(per_slice: Sequence[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """A series' intensity figures: the median over its slices of each slice's percentiles (as the
    profile holds each golden image's)."""
    if not per_slice:
        return None
    a = np.asarray(per_slice, dtype=np.float64)
    return float(np.median(a[:, 0])), float(np.median(a[:, 1])), float(np.median(a[:, 2]))


def _outside(value: float | None, r: Range | None, lo: float, hi: float) -> bool:
    return value is not None and r is not None and not (r[0] * lo - 1e-6 <= value <= r[1] * hi + 1e-6)


def _fmt(r: Range, unit: str) -> str:
    return f"{r[0]:g} {unit}" if r[0] == r[1] else f"{r[0]:g}-{r[1]:g} {unit}"


def input_reasons(profile: InputProfile, f: SeriesFeatures) -> list[str]:
    """The ways the input is unlike the verified images."""
    if not profile.recorded:
        return []
    out: list[str] = []
    if f.model_spacing is not None:  # a 3D model resamples: only a coarser input loses what it was verified on
        ms = f.model_spacing
        if f.slice_thickness is not None and f.slice_thickness > ms[0] * SPACING_FACTOR:
            out.append(f"slice spacing {f.slice_thickness:g} mm is coarser than the model's {ms[0]:g} mm "
                       f"(x{SPACING_FACTOR:g})")
        if f.pixel_spacing is not None and max(f.pixel_spacing) > max(ms[1:]) * SPACING_FACTOR:
            out.append(f"pixel spacing {max(f.pixel_spacing):g} mm is coarser than the model's {max(ms[1:]):g} mm")
    else:
        if _outside(f.slice_thickness, profile.slice_thickness_mm, 1 / SPACING_FACTOR, SPACING_FACTOR):
            out.append(f"slice thickness {f.slice_thickness:g} mm is outside the "
                       f"{_fmt(profile.slice_thickness_mm, 'mm')} verified (x{SPACING_FACTOR:g})")  # type: ignore[arg-type]
        if f.pixel_spacing is not None and _outside(max(f.pixel_spacing), profile.pixel_spacing_mm, 1 / SPACING_FACTOR,
                                                    SPACING_FACTOR):
            out.append(f"pixel spacing {max(f.pixel_spacing):g} mm is outside the "
                       f"{_fmt(profile.pixel_spacing_mm, 'mm')} verified (x{SPACING_FACTOR:g})")  # type: ignore[arg-type]
        if _outside(f.fov_mm, profile.fov_mm, 1 / SPACING_FACTOR, SPACING_FACTOR):
            out.append(f"field of view {f.fov_mm:g} mm is outside the {_fmt(profile.fov_mm, 'mm')} verified")  # type: ignore[arg-type]
    for name, value, r in (("1st", f.p1, profile.p1), ("99th", f.p99, profile.p99)):
        if value is not None and r is not None and not r[0] - INTENSITY_MARGIN <= value <= r[1] + INTENSITY_MARGIN:
            out.append(f"intensity {name} percentile {value:.0f} is outside the verified {r[0]:.0f}..{r[1]:.0f} "
                       f"(± {INTENSITY_MARGIN:g}): another scanner calibration, contrast or unit?")
    return out


def mask_reasons(profile: InputProfile, masks: np.ndarray, classes: Sequence[int], labels: dict[int, str],
                 f: SeriesFeatures) -> list[str]:
    """Fragmented masks, and segments whose size the golden set never showed."""
    from attunet_deploy.components import count

    out: list[str] = []
    parts = count(masks, classes) if f.volume else {c: max((count(m, [c])[c] for m in masks), default=0)
                                                      for c in classes}
    limit = max(COMPONENTS_FLOOR, COMPONENTS_FACTOR * (profile.components_max or 0))
    for c, n in parts.items():
        if n > limit:
            out.append(f"{labels.get(c, f'class {c}')} is in {n} pieces (at most {limit} expected)")
    if f.voxel_mm3 is None or not profile.segment_size:
        return out
    for c, r in profile.segment_size.items():
        if c not in classes:
            continue
        if f.volume:
            size, unit = float((masks == c).sum()) * f.voxel_mm3 / 1000.0, "ml"
        else:
            per_slice = (masks == c).reshape(len(masks), -1).sum(axis=1)
            size, unit = float(per_slice.max(initial=0)) * f.voxel_mm3, "mm2"  # voxel_mm3: pixel area here
        if unit == profile.size_unit and not r[0] / SIZE_FACTOR <= size <= r[1] * SIZE_FACTOR:
            out.append(f"{labels.get(c, f'class {c}')} {size:.3g} {unit} is outside the {r[0]:.3g}-{r[1]:.3g} {unit} "
                       f"seen on the golden set (÷/x{SIZE_FACTOR:g})")
    return out


def assess(profile: InputProfile, features: SeriesFeatures, masks: np.ndarray, tally: MaskTally | None,
           labels: dict[int, str]) -> QaResult:
    """The QA flag of one series (or image set) segmented into ``masks``."""
    classes = sorted(labels)
    reasons = list(features.forced) + input_reasons(profile, features)
    if tally is not None and tally.share > UNCERTAIN_SHARE:
        reasons.append(f"{100 * tally.share:.0f}% of the segmented region is uncertain (probability within "
                       f"±{UNCERTAIN_BAND:g} of the decision), above {100 * UNCERTAIN_SHARE:.0f}%")
    reasons += mask_reasons(profile, masks, classes, labels, features)
    return QaResult.of(reasons)
