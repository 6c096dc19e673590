"""Run backends on the bundle's golden inputs and judge them against the PyTorch FP32 logits.

Works without torch: the reference outputs are stored in ``golden.npz`` at export time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .bundle import GOLDEN_FILE, PRECISIONS, Bundle
from .console import Reporter
from .errors import BackendUnavailable, BundleError, InputError
from .metrics import abs_errors, confident_flips, per_image_overlap, rel_l2
from .preprocess import logits_to_masks
from .runtimes.base import BACKEND_MODULES, available_backends, runner_class


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria; None means 'reported only'. Fractions, not percent."""

    rel_l2: float | None = None
    pixel_agreement: float | None = None
    mean_dice: float | None = None
    worst_dice: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


#: design.md section 7.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rel_l2=1e-4, pixel_agreement=0.9999),
    "fp16": Tolerance(rel_l2=1e-2, mean_dice=0.995, worst_dice=0.98),
    "int8": Tolerance(mean_dice=0.98, worst_dice=0.95),
}


@dataclass
class GoldenCase:
    inputs: np.ndarray  # model space, float32 [N, C, H, W]
    logits: np.ndarray  # PyTorch FP32 reference [N, K, H, W]
    labels: np.ndarray | None = None  # ground-truth masks [N, H, W] (demo bundle)


def load_golden(bundle: Bundle) -> list[GoldenCase]:
    path = bundle.require(GOLDEN_FILE)
    try:
        with np.load(path) as data:
            cases = []
            i = 0
            while f"case{i}_input" in data:
                labels = data.get(f"case{i}_labels")
                cases.append(GoldenCase(data[f"case{i}_input"], data[f"case{i}_logits"], labels))
                i += 1
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path} is unreadable ({exc}); re-export the bundle") from exc
    if not cases:
        raise BundleError(f"{path} holds no golden cases; re-export the bundle")
    return cases


def compare(outputs: list[np.ndarray], cases: list[GoldenCase], postprocessing: dict[str, Any],
            tolerance: Tolerance) -> dict[str, Any]:
    """Metrics of ``outputs`` (one array per golden case) against the reference, and the verdict."""
    out = np.concatenate([o.ravel() for o in outputs])
    ref = np.concatenate([c.logits.ravel() for c in cases])
    max_abs, mean_abs = abs_errors(out, ref)
    num_classes = cases[0].logits.shape[1]
    masks = [logits_to_masks(o, postprocessing) for o in outputs]
    ref_masks = [logits_to_masks(c.logits, postprocessing) for c in cases]
    total = sum(m.size for m in masks)
    flipped = sum(int((m != r).sum()) for m, r in zip(masks, ref_masks))
    dices: list[float] = []
    ious: list[float] = []
    for m, r in zip(masks, ref_masks):
        d, j = per_image_overlap(m, r, max(num_classes, 2))
        dices += d
        ious += j
    row: dict[str, Any] = {
        "rel_l2": rel_l2(out, ref),
        "max_abs": max_abs,
        "mean_abs": mean_abs,
        "pixel_agreement": 1.0 - flipped / total,
        "mean_dice": float(np.mean(dices)),
        "worst_dice": float(np.min(dices)),
        "mean_iou": float(np.mean(ious)),
        "flipped_pixels": flipped,
        "confident_flips": sum(confident_flips(m, r, c.logits) for m, r, c in zip(masks, ref_masks, cases)),
        "images": len(dices),
    }
    if all(c.labels is not None for c in cases):
        gt: list[float] = []
        for m, c in zip(masks, cases):
            gt += per_image_overlap(m, c.labels, max(num_classes, 2))[0]
        row["gt_dice"] = float(np.mean(gt))
    failures = judge(row, tolerance)
    row["status"] = "fail" if failures else "pass"
    row["reason"] = "; ".join(failures)
    row["tolerance"] = tolerance.to_dict()
    return row


def judge(row: dict[str, Any], tol: Tolerance) -> list[str]:
    """Human-readable list of missed criteria (empty when everything holds)."""
    failures = []
    if tol.rel_l2 is not None and not row["rel_l2"] <= tol.rel_l2:
        failures.append(f"rel_l2 {row['rel_l2']:.3g} > {tol.rel_l2:g}")
    if tol.pixel_agreement is not None and not row["pixel_agreement"] >= tol.pixel_agreement:
        failures.append(f"pixel agreement {100 * row['pixel_agreement']:.4f}% < {100 * tol.pixel_agreement:g}%")
    if tol.mean_dice is not None and not row["mean_dice"] >= tol.mean_dice:
        failures.append(f"mean Dice {row['mean_dice']:.4f} < {tol.mean_dice:g}")
    if tol.worst_dice is not None and not row["worst_dice"] >= tol.worst_dice:
        failures.append(f"worst Dice {row['worst_dice']:.4f} < {tol.worst_dice:g}")
    return failures


def run_backend(bundle: Bundle, backend: str, precision: str, cases: list[GoldenCase],
                tolerance: Tolerance, **runner_options: Any) -> dict[str, Any]:
    """One verification row; BackendUnavailable becomes an 'unavailable' row, not an error."""
    base = {"backend": backend, "precision": precision}
    try:
        cls = runner_class(backend)
        if precision not in cls.precisions:
            raise BackendUnavailable(f"{backend} runs {', '.join(cls.precisions)} only")
        reason = cls.availability(bundle, precision)
        if reason is not None:
            raise BackendUnavailable(reason)
        with cls(bundle, precision, **runner_options) as runner:
            outputs = [runner.infer(c.inputs) for c in cases]
            device = runner.device
    except BackendUnavailable as exc:
        return {**base, "status": "unavailable", "reason": str(exc), "tolerance": tolerance.to_dict()}
    return {**base, "device": device, **compare(outputs, cases, bundle.postprocessing, tolerance)}


def expand(bundle: Bundle, backends: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs for 'all' selections, torch only at fp32."""
    if backends == ["all"]:
        backends = list(BACKEND_MODULES)
    if precisions == ["all"]:
        precisions = list(PRECISIONS)
    for b in backends:
        if b not in BACKEND_MODULES:
            raise InputError(f"unknown backend {b!r}; choose all or one of {', '.join(BACKEND_MODULES)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise InputError(f"unknown precision {p!r}; choose all or one of {', '.join(PRECISIONS)}")
    return [(b, p) for b in backends for p in precisions if not (b == "torch" and p != "fp32")]


def verify(bundle: Bundle, backends: list[str], precisions: list[str],
           tolerances: dict[str, Tolerance] | None = None, reporter: Reporter | None = None,
           record: bool = True, **runner_options: Any) -> list[dict[str, Any]]:
    """Verify every requested (backend, precision); record results in the manifest."""
    reporter = reporter or Reporter()
    tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    pairs = expand(bundle, backends, precisions)
    cases = load_golden(bundle)
    rows = []
    with reporter.progress("Verifying against PyTorch FP32 golden outputs", len(pairs)) as advance:
        for backend, precision in pairs:
            rows.append(run_backend(bundle, backend, precision, cases, tolerances[precision], **runner_options))
            advance()
    if record:
        try:
            bundle.record_verification(rows)
        except OSError as exc:  # e.g. a bundle on a read-only mount of a device
            reporter.notice("not recorded in the manifest:", str(exc))
    return rows


def summary_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "unavailable": 0}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


__all__ = ["DEFAULT_TOLERANCES", "GoldenCase", "Tolerance", "available_backends", "compare", "expand",
           "judge", "load_golden", "run_backend", "verify"]
