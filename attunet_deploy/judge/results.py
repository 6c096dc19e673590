"""Typed records of what ``verify`` and ``bench`` found: :class:`VerifyRow`, :class:`BenchResult`,
:class:`Skip`, the :class:`Status` of a verification row and the :class:`Tolerance` it was judged by.

Records are only records (frozen dataclasses, as Polygraphy's ``comparator/struct.py``): JSON is
made at the edges by ``to_dict()`` (``verify --json``, ``bench --json``, report.json and the
manifest's ``verification`` section, key for key and in the order they always had) and read back by
``from_dict()`` (rows recorded in a manifest or a report).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from attunet_deploy.errors import InputError

JsonRow = dict[str, Any]


class Status(str, enum.Enum):
    """A verification row's verdict."""

    PASS = "pass"
    FAIL = "fail"
    UNAVAILABLE = "unavailable"  # the backend cannot run here (the reason says why)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria; None means 'reported only'. Fractions, not percent."""

    rel_l2: float | None = None
    pixel_agreement: float | None = None
    mean_dice: float | None = None
    worst_dice: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"tolerance {f.name} {v!r}: must be a finite number (or 'none')", field=f.name)
            if f.name == "rel_l2" and v < 0:
                raise InputError(f"tolerance {f.name} {v}: must be >= 0", field=f.name)
            if f.name != "rel_l2" and not 0.0 <= v <= 1.0:
                raise InputError(f"tolerance {f.name} {v}: must be a fraction in [0, 1]", field=f.name)

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WorstImage:
    """One of a row's lowest-Dice images."""

    file: str
    dice: float

    def to_dict(self) -> JsonRow:
        return {"file": self.file, "dice": self.dice}


@dataclass(frozen=True)
class Agreement:
    """How closely one backend's outputs follow the reference's (docs/design.md section 7)."""

    rel_l2: float
    max_abs: float
    mean_abs: float
    pixel_agreement: float
    mean_dice: float
    worst_dice: float
    mean_iou: float
    flipped_pixels: int
    confident_flips: int
    images: int
    worst_images: tuple[WorstImage, ...]
    #: Dice against ground truth, and the reference's minus this one (only where labels exist)
    gt_dice: float | None = None
    gt_dice_drop: float | None = None
    #: Dice of every judged image against the reference (and against the truth, with labels), in
    #: judging order: what report.html's distributions are drawn from
    dice_per_image: tuple[float, ...] | None = None
    gt_dice_per_image: tuple[float, ...] | None = None

    _ALWAYS = ("rel_l2", "max_abs", "mean_abs", "pixel_agreement", "mean_dice", "worst_dice", "mean_iou",
               "flipped_pixels", "confident_flips", "images")
    _OPTIONAL = ("gt_dice", "gt_dice_drop", "dice_per_image", "gt_dice_per_image")

    def to_dict(self) -> JsonRow:
        d: JsonRow = {k: getattr(self, k) for k in self._ALWAYS}
        d["worst_images"] = [w.to_dict() for w in self.worst_images]
        for k in self._OPTIONAL:
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Agreement | None:
        """The figures of a recorded row (None where it has none, or they are not numbers)."""
        if any(not isinstance(d.get(k), (int, float)) for k in cls._ALWAYS if k != "images"):
            return None
        def per_image(key: str) -> tuple[float, ...] | None:
            v = d.get(key)
            return tuple(float(x) for x in v) if isinstance(v, list) else None

        def opt(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, (int, float)) else None

        return cls(float(d["rel_l2"]), float(d["max_abs"]), float(d["mean_abs"]), float(d["pixel_agreement"]),
                   float(d["mean_dice"]), float(d["worst_dice"]), float(d["mean_iou"]), int(d["flipped_pixels"]),
                   int(d["confident_flips"]), int(d.get("images", 0)),
                   tuple(WorstImage(str(w["file"]), float(w["dice"])) for w in d.get("worst_images", [])),
                   opt("gt_dice"), opt("gt_dice_drop"), per_image("dice_per_image"), per_image("gt_dice_per_image"))


@dataclass(frozen=True)
class VerifyRow:
    """One backend/precision judged against the reference."""

    backend: str
    precision: str
    reference: str
    status: Status
    reason: str = ""
    tolerance: Mapping[str, float | None] = field(default_factory=dict)
    device: str | None = None
    agreement: Agreement | None = None
    diff_images: tuple[str, ...] | None = None
    #: the worst images with both masks (judge/panels.py), for report.html and --save-diff; not
    #: part of the JSON record (pictures are written from it, not stored in it)
    panels: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> JsonRow:
        d: JsonRow = {"backend": self.backend, "precision": self.precision, "reference": self.reference}
        if self.device is not None:
            d["device"] = self.device
        if self.agreement is not None:
            d.update(self.agreement.to_dict())
        d.update(status=Status(self.status).value, reason=self.reason, tolerance=dict(self.tolerance))
        if self.diff_images is not None:
            d["diff_images"] = list(self.diff_images)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VerifyRow:
        """A row as recorded (manifest, report.json); unknown keys (a record's ``time``) are ignored."""
        diff = d.get("diff_images")
        status = d.get("status")
        tolerance = d.get("tolerance")
        return cls(str(d.get("backend", "?")), str(d.get("precision", "?")), str(d.get("reference", "torch/fp32")),
                   Status(status) if status in {s.value for s in Status} else Status.FAIL,
                   str(d.get("reason", "") or ""), dict(tolerance) if isinstance(tolerance, Mapping) else {},
                   d.get("device"), Agreement.from_dict(d), tuple(diff) if isinstance(diff, list) else None)

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"

    def metric(self, key: str) -> Any:
        """An agreement figure by name (None where the row has none: unavailable, or a backend that broke)."""
        return getattr(self.agreement, key, None) if self.agreement is not None else None

    @property
    def mean_dice(self) -> float | None:
        return self.metric("mean_dice")

    @property
    def worst_images(self) -> tuple[WorstImage, ...]:
        return self.agreement.worst_images if self.agreement is not None else ()


@dataclass(frozen=True)
class Skip:
    """A backend/precision that could not be timed here, and why."""

    backend: str
    precision: str
    reason: str

    def to_dict(self) -> JsonRow:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason}


@dataclass(frozen=True)
class BenchResult:
    """One runner's timings (docs/design.md section 8)."""

    backend: str
    precision: str
    device: str
    shape: tuple[int, ...]
    mode: str
    warmup: int
    iterations: int
    latency_ms: Mapping[str, float]
    throughput_ips: float
    cov: float
    peak_rss_mb: float | None
    threads: int | None
    concurrency: int
    timing: str
    versions: Mapping[str, Any]
    machine: Mapping[str, Any]
    device_latency_ms: Mapping[str, float] | None = None
    #: backend facts worth keeping with the timings (device memory, CUDA graphs, OpenVINO hints)
    extras: Mapping[str, Any] = field(default_factory=dict)
    #: p50 over the first result's p50 in one run (set by ``bench_many``; None when the first is 0)
    ratio_vs_first: float | None = None
    has_ratio: bool = False

    _KEYS = ("backend", "precision", "device", "shape", "mode", "warmup", "iterations", "latency_ms",
             "throughput_ips", "cov", "peak_rss_mb", "threads", "concurrency", "timing", "versions", "machine")

    def with_ratio(self, first_p50: float) -> BenchResult:
        return dataclasses.replace(self, ratio_vs_first=self.latency_ms["p50"] / first_p50 if first_p50 > 0 else None,
                                   has_ratio=True)

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def p50(self) -> float:
        return float(self.latency_ms["p50"])

    def to_dict(self) -> JsonRow:
        d: JsonRow = {k: getattr(self, k) for k in self._KEYS}
        d["shape"] = list(self.shape)
        d["latency_ms"] = dict(self.latency_ms)
        d["versions"], d["machine"] = dict(self.versions), dict(self.machine)
        if self.device_latency_ms is not None:
            d["device_latency_ms"] = dict(self.device_latency_ms)
        d.update(self.extras)
        if self.has_ratio:
            d["ratio_vs_first"] = self.ratio_vs_first
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchResult:
        known = {*cls._KEYS, "device_latency_ms", "ratio_vs_first"}
        return cls(str(d["backend"]), str(d["precision"]), str(d.get("device", "")), tuple(d.get("shape", ())),
                   str(d.get("mode", "compute")), int(d.get("warmup", 0)), int(d.get("iterations", 0)),
                   dict(d["latency_ms"]), float(d.get("throughput_ips", 0.0)), float(d.get("cov", 0.0)),
                   d.get("peak_rss_mb"), d.get("threads"), int(d.get("concurrency", 1)), str(d.get("timing", "")),
                   dict(d.get("versions", {})), dict(d.get("machine", {})), d.get("device_latency_ms"),
                   {k: v for k, v in d.items() if k not in known}, d.get("ratio_vs_first"), "ratio_vs_first" in d)
