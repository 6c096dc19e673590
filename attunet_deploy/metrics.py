"""Agreement metrics between a backend's output and the PyTorch FP32 reference (numpy only)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: A reference logit with |z| above this is "confident": flipping it is a real error.
CONFIDENT_LOGIT = 2.0


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref||_2 / ||ref||_2 (0 when both are zero; inf when only ref is zero)."""
    diff = np.linalg.norm((np.asarray(out, np.float64) - np.asarray(ref, np.float64)).ravel())
    norm = np.linalg.norm(np.asarray(ref, np.float64).ravel())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / norm)


def streamed_errors(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, float]:
    """(rel L2, max abs, mean abs) over many (out, ref) pairs, as if concatenated, holding one
    pair's float64 difference at a time (a concatenated float64 copy of 512 images is ~1 GB)."""
    sq_diff = sq_ref = sum_abs = 0.0
    max_abs = 0.0
    n = 0
    for out, ref in pairs:
        r = np.asarray(ref, np.float64).ravel()
        d = np.asarray(out, np.float64).ravel() - r
        sq_diff += float(np.dot(d, d))
        sq_ref += float(np.dot(r, r))
        a = np.abs(d)
        max_abs = max(max_abs, float(a.max(initial=0.0)))
        sum_abs += float(a.sum())
        n += d.size
    diff, norm = np.sqrt(sq_diff), np.sqrt(sq_ref)
    rel = (0.0 if diff == 0.0 else float("inf")) if norm == 0.0 else float(diff / norm)
    return rel, max_abs, (sum_abs / n if n else 0.0)


def abs_errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute error."""
    d = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    return float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks; two empty masks give 1.0."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def per_image_overlap(masks: np.ndarray, ref_masks: np.ndarray, num_classes: int) -> tuple[list[float], list[float]]:
    """Per-image Dice and IoU. One output channel: the foreground mask. Several classes: the
    mean over foreground classes 1..K-1 (a class absent from both masks scores 1)."""
    dices, ious = [], []
    classes = [1] if num_classes <= 2 else list(range(1, num_classes))
    for m, r in zip(masks, ref_masks):
        dices.append(float(np.mean([dice(m == c, r == c) for c in classes])))
        ious.append(float(np.mean([iou(m == c, r == c) for c in classes])))
    return dices, ious


def confident_flips(masks: np.ndarray, ref_masks: np.ndarray, ref_logits: np.ndarray,
                    threshold: float = CONFIDENT_LOGIT) -> int:
    """Flipped pixels where the reference was confident.

    One channel: |logit| > threshold. Several: the reference's top-1 minus top-2 logit margin
    exceeds the threshold.
    """
    flipped = masks != ref_masks
    if ref_logits.shape[1] == 1:
        confident = np.abs(ref_logits[:, 0]) > threshold
    else:
        top2 = np.sort(ref_logits, axis=1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) > threshold
    return int(np.logical_and(flipped, confident).sum())
