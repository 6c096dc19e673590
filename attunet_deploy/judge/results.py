"""Typed records of what ``verify`` and ``bench`` found: :class:`VerifyRow`, :class:`BenchResult`,
:class:`Skip`, and the :class:`Status` of a verification row.

``to_dict()`` gives the JSON written today (``verify --json``, ``bench --json``, report.json and
the manifest's ``verification`` section), key for key and in the same order. The records also
read like those dicts (``row["status"]``), so code and reports written against the dicts, and
rows loaded back from old manifests and reports (plain dicts), are read the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """A verification row's verdict."""

    PASS = "pass"
    FAIL = "fail"
    UNAVAILABLE = "unavailable"  # the backend cannot run here (the reason says why)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Record(Mapping[str, Any]):
    """Read access by key, exactly as the dict :meth:`to_dict` returns."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(eq=False)
class Agreement(Record):
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
    worst_images: list[dict[str, Any]]
    #: Dice against ground truth, and the reference's minus this one (only where labels exist)
    gt_dice: float | None = None
    gt_dice_drop: float | None = None
    #: Dice of every judged image against the reference (and against the truth, with labels), in
    #: judging order: what report.html's distributions are drawn from
    dice_per_image: list[float] | None = None
    gt_dice_per_image: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("rel_l2", "max_abs", "mean_abs", "pixel_agreement", "mean_dice",
                                           "worst_dice", "mean_iou", "flipped_pixels", "confident_flips",
                                           "images", "worst_images")}
        if self.gt_dice is not None:
            d["gt_dice"] = self.gt_dice
        if self.gt_dice_drop is not None:
            d["gt_dice_drop"] = self.gt_dice_drop
        if self.dice_per_image is not None:
            d["dice_per_image"] = self.dice_per_image
        if self.gt_dice_per_image is not None:
            d["gt_dice_per_image"] = self.gt_dice_per_image
        return d


@dataclass(eq=False)
class VerifyRow(Record):
    """One backend/precision judged against the reference."""

    backend: str
    precision: str
    reference: str
    status: Status
    reason: str = ""
    tolerance: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    agreement: Agreement | None = None
    diff_images: list[Any] | None = None
    #: the worst images with both masks (judge/panels.py), for report.html and --save-diff; not
    #: part of the JSON record (pictures are written from it, not stored in it)
    panels: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backend": self.backend, "precision": self.precision, "reference": self.reference}
        if self.device is not None:
            d["device"] = self.device
        if self.agreement is not None:
            d.update(self.agreement.to_dict())
        d.update(status=Status(self.status).value, reason=self.reason, tolerance=dict(self.tolerance))
        if self.diff_images is not None:
            d["diff_images"] = self.diff_images
        return d

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass(eq=False)
class Skip(Record):
    """A backend/precision that could not be timed here, and why."""

    backend: str
    precision: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason}


@dataclass(eq=False)
class BenchResult(Record):
    """One runner's timings (docs/design.md section 8)."""

    backend: str
    precision: str
    device: str
    shape: list[int]
    mode: str
    warmup: int
    iterations: int
    latency_ms: dict[str, float]
    throughput_ips: float
    cov: float
    peak_rss_mb: float | None
    threads: int | None
    concurrency: int
    timing: str
    versions: dict[str, Any]
    machine: dict[str, Any]
    device_latency_ms: dict[str, float] | None = None
    #: backend facts worth keeping with the timings (device memory, CUDA graphs, OpenVINO hints)
    extras: dict[str, Any] = field(default_factory=dict)
    #: p50 over the first result's p50 in one run (set by ``bench_many``; None when the first is 0)
    ratio_vs_first: float | None = None
    has_ratio: bool = False

    def set_ratio(self, first_p50: float) -> None:
        self.ratio_vs_first = self.latency_ms["p50"] / first_p50 if first_p50 > 0 else None
        self.has_ratio = True

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("backend", "precision", "device", "shape", "mode", "warmup",
                                           "iterations", "latency_ms", "throughput_ips", "cov", "peak_rss_mb",
                                           "threads", "concurrency", "timing", "versions", "machine")}
        if self.device_latency_ms is not None:
            d["device_latency_ms"] = self.device_latency_ms
        d.update(self.extras)
        if self.has_ratio:
            d["ratio_vs_first"] = self.ratio_vs_first
        return d
