"""Judge backends against a reference: the bundle's golden set, or any (labelled) image set.

Works without torch: the golden set stores PyTorch FP32 logits made at export time, and
``verify --images`` falls back to ONNX Runtime CPU FP32 (which export checked against PyTorch)
as its reference. Every row says which reference it was judged against.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import WEIGHTS_FILE, Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import AttDeployError, BackendUnavailable, InputError
from attunet_deploy.io.golden import GoldenCase, group_by_shape, load_golden, require_labels
from attunet_deploy.judge.panels import collect_panels
from attunet_deploy.judge.results import Agreement, Status, Tolerance, VerifyRow, WorstImage
from attunet_deploy.metrics import confident_flips, per_image_overlap, streamed_errors
from attunet_deploy.runtimes import registry
from attunet_deploy.runtimes.registry import available_backends
from attunet_deploy.runtimes.select import open_runner
from attunet_deploy.segmenter import Segmenter

#: How many of a row's lowest-Dice images it lists.
WORST_SHOWN = 3


#: docs/design.md section 7.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rel_l2=1e-4, pixel_agreement=0.9999),
    "fp16": Tolerance(rel_l2=1e-2, mean_dice=0.995, worst_dice=0.98),
    "int8": Tolerance(mean_dice=0.98, worst_dice=0.95),
}


def check_dice_drop(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise InputError(f"the largest Dice drop {value!r} must be a fraction in [0, 1]", field="max_dice_drop")
    return float(value)


def _gt_dices(masks: list[np.ndarray], cases: list[GoldenCase], num_classes: int) -> list[float] | None:
    """Dice of each image against its ground truth (None without labels)."""
    if not cases or not all(c.labels is not None for c in cases):
        return None
    gt: list[float] = []
    for m, c in zip(masks, cases):
        assert c.labels is not None  # checked above
        gt += per_image_overlap(m, c.labels, max(num_classes, 2))[0]
    return gt


def reference_gt_dice(cases: list[GoldenCase], segmenter: Segmenter) -> float | None:
    """Dice of the reference's masks against the ground truth (None without labels)."""
    if not cases:
        return None
    ref_masks = [segmenter.masks(c.logits) for c in cases]
    gt = _gt_dices(ref_masks, cases, cases[0].logits.shape[1])
    return None if gt is None else float(np.mean(gt))


def compare(outputs: list[np.ndarray], cases: list[GoldenCase], segmenter: Segmenter,
            tolerance: Tolerance, ref_gt_dice: float | None = None,
            max_dice_drop: float | None = None) -> VerifyRow:
    """Metrics of ``outputs`` (one array per case) against the reference logits, and the verdict
    (the row's backend, precision and reference are left for the caller to fill in). Masks are the
    Segmenter's, post-processing included, on both sides."""
    rel, max_abs, mean_abs = streamed_errors((o, c.logits) for o, c in zip(outputs, cases))
    num_classes = cases[0].logits.shape[1]
    masks = [segmenter.masks(o) for o in outputs]
    ref_masks = [segmenter.masks(c.logits) for c in cases]
    total = sum(m.size for m in masks)
    flipped = sum(int((m != r).sum()) for m, r in zip(masks, ref_masks))
    dices: list[float] = []
    ious: list[float] = []
    names: list[str] = []
    for m, r, c in zip(masks, ref_masks, cases):
        d, j = per_image_overlap(m, r, max(num_classes, 2))
        dices += d
        ious += j
        names += c.image_names()
    worst = sorted(range(len(dices)), key=lambda i: (dices[i], i))[:WORST_SHOWN]
    gts = _gt_dices(masks, cases, num_classes)
    gt = float(np.mean(gts)) if gts is not None else None
    if gts is not None and ref_gt_dice is None:
        ref_gt_dice = reference_gt_dice(cases, segmenter)
    agreement = Agreement(
        rel_l2=rel, max_abs=max_abs, mean_abs=mean_abs, pixel_agreement=1.0 - flipped / total,
        mean_dice=float(np.mean(dices)), worst_dice=float(np.min(dices)), mean_iou=float(np.mean(ious)),
        flipped_pixels=flipped,
        confident_flips=sum(confident_flips(m, r, c.logits) for m, r, c in zip(masks, ref_masks, cases)),
        images=len(dices), worst_images=tuple(WorstImage(names[i], dices[i]) for i in worst),
        dice_per_image=tuple(float(d) for d in dices), gt_dice=gt,
        gt_dice_drop=float(ref_gt_dice - gt) if gt is not None and ref_gt_dice is not None else None,
        gt_dice_per_image=tuple(float(d) for d in gts) if gts is not None else None)
    failures = judge(agreement, tolerance)
    drop = agreement.gt_dice_drop
    if max_dice_drop is not None and drop is not None and not drop <= max_dice_drop:
        failures.append(f"Dice vs truth drops {drop:.4f} > {max_dice_drop:g}")
    tol: dict[str, float | None] = dict(tolerance.to_dict())
    if max_dice_drop is not None:
        tol["max_dice_drop"] = max_dice_drop
    return VerifyRow(backend="", precision="", reference="", status=Status.FAIL if failures else Status.PASS,
                     reason="; ".join(failures), tolerance=tol, agreement=agreement)


def judge(a: Agreement, tol: Tolerance) -> list[str]:
    """Human-readable list of missed criteria (empty when everything holds)."""
    failures = []
    if tol.rel_l2 is not None and not a.rel_l2 <= tol.rel_l2:
        failures.append(f"rel_l2 {a.rel_l2:.3g} > {tol.rel_l2:g}")
    if tol.pixel_agreement is not None and not a.pixel_agreement >= tol.pixel_agreement:
        failures.append(f"pixel agreement {100 * a.pixel_agreement:.4f}% < {100 * tol.pixel_agreement:g}%")
    if tol.mean_dice is not None and not a.mean_dice >= tol.mean_dice:
        failures.append(f"mean Dice {a.mean_dice:.4f} < {tol.mean_dice:g}")
    if tol.worst_dice is not None and not a.worst_dice >= tol.worst_dice:
        failures.append(f"worst Dice {a.worst_dice:.4f} < {tol.worst_dice:g}")
    return failures


def run_outputs(bundle: Bundle, backend: str, precision: str, cases: list[GoldenCase],
                **runner_options: Any) -> tuple[list[np.ndarray], str]:
    """Outputs of one backend for every case; raises BackendUnavailable when it cannot run here."""
    reason = registry.check(bundle, backend, precision)
    if reason is not None:
        raise BackendUnavailable(reason)
    # verification judges the backend on every golden case itself: its runner skips the self-check
    with open_runner(bundle, backend, precision, **{"self_check": False, **runner_options}) as runner:
        outputs = [runner.infer_volume(c.inputs) if c.volume else runner.infer(c.inputs) for c in cases]
        return outputs, runner.device


def run_backend(bundle: Bundle, backend: str, precision: str, cases: list[GoldenCase], tolerance: Tolerance,
                *, reference: str = "torch/fp32", ref_gt_dice: float | None = None,
                max_dice_drop: float | None = None, keep: dict[str, list[np.ndarray]] | None = None,
                **runner_options: Any) -> VerifyRow:
    """One verification row; BackendUnavailable becomes an 'unavailable' row, a backend that fails
    at run time a 'fail' row. ``keep`` receives the outputs (for diff images)."""
    try:
        outputs, device = run_outputs(bundle, backend, precision, cases, **runner_options)
    except BackendUnavailable as exc:
        return VerifyRow(backend, precision, reference, Status.UNAVAILABLE, str(exc), tolerance.to_dict())
    except AttDeployError:
        raise
    except Exception as exc:  # the backend itself broke on the golden inputs: a failed verification
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return VerifyRow(backend, precision, reference, Status.FAIL, f"{backend} raised {type(exc).__name__}: {text}",
                         tolerance.to_dict())
    if keep is not None:
        keep["outputs"] = outputs
    row = compare(outputs, cases, Segmenter(bundle.spec), tolerance, ref_gt_dice=ref_gt_dice,
                  max_dice_drop=max_dice_drop)
    return replace(row, backend=backend, precision=precision, reference=reference, device=device)


def _judge_all(bundle: Bundle, pairs: list[tuple[str, str]], cases: list[GoldenCase],
               tolerances: dict[str, Tolerance], reference: str, max_dice_drop: float | None,
               save_diff: Path | None, reporter: Reporter, title: str, **runner_options: Any
               ) -> list[VerifyRow]:
    segmenter = Segmenter(bundle.spec)
    ref_gt = reference_gt_dice(cases, segmenter)
    rows: list[VerifyRow] = []
    with reporter.progress(title, len(pairs)) as advance:
        for backend, precision in pairs:
            keep: dict[str, list[np.ndarray]] = {}
            row = run_backend(bundle, backend, precision, cases, tolerances[precision], reference=reference,
                              ref_gt_dice=ref_gt, max_dice_drop=max_dice_drop, keep=keep, **runner_options)
            if "outputs" in keep and row.agreement is not None:
                row = replace(row, panels=tuple(collect_panels(row.agreement.worst_images, keep["outputs"], cases,
                                                               segmenter)))
            if save_diff is not None and row.panels:
                from attunet_deploy.judge.diffimages import write_diff_images

                row = replace(row, diff_images=tuple(write_diff_images(save_diff, row, list(row.panels))))
            rows.append(row)
            advance()
    if save_diff is not None:
        from attunet_deploy.judge.diffimages import write_diff_index

        write_diff_index(save_diff, rows, reference)
    return rows


def _check_diff_target(bundle: Bundle, save_diff: str | os.PathLike[str] | None) -> None:
    """--save-diff is checked before any work: new or empty, outside every bundle, a real place."""
    if save_diff is not None:
        from attunet_deploy.outputs import check_output

        check_output(save_diff, "--save-diff", kind="dir", empty=True, bundles=[bundle.root])


def verify(bundle: Bundle, backends: list[str], precisions: list[str],
           tolerances: dict[str, Tolerance] | None = None, reporter: Reporter | None = None,
           max_dice_drop: float | None = None, save_diff: str | os.PathLike[str] | None = None,
           **runner_options: Any) -> list[VerifyRow]:
    """Verify every requested (backend, precision) on the bundle's golden set.

    Nothing is recorded here: the caller records passing runs in a transaction.
    """
    reporter = reporter or Reporter()
    tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    max_dice_drop = check_dice_drop(max_dice_drop)
    _check_diff_target(bundle, save_diff)
    pairs = registry.expand(backends, precisions)
    cases = load_golden(bundle)
    if max_dice_drop is not None:
        require_labels(cases)
    reference = bundle.golden.reference
    return _judge_all(bundle, pairs, cases, tolerances, reference, max_dice_drop,
                      Path(save_diff) if save_diff is not None else None, reporter,
                      f"Verifying against {reference} golden outputs", **runner_options)


def reference_backend(bundle: Bundle) -> str:
    """torch when it can run this bundle here, else ONNX Runtime CPU (export checked it against torch)."""
    from attunet_deploy.environment import has_module

    if has_module("torch") and (bundle.has(WEIGHTS_FILE) or bundle.has("model.ts")):
        return "torch"
    return "ort"


@dataclass(frozen=True)
class ImageSet:
    """Images to judge backends on instead of the golden set (a file or folder), with optional
    ground-truth ``labels``; 2D images beyond ``max_images`` (default: limits.VERIFY_IMAGES) are
    sampled evenly."""

    images: str | os.PathLike[str]
    labels: str | os.PathLike[str] | None = None
    max_images: int | None = None


def verify_images(bundle: Bundle, image_set: ImageSet, backends: list[str], precisions: list[str],
                  tolerances: dict[str, Tolerance] | None = None, reporter: Reporter | None = None,
                  max_dice_drop: float | None = None, save_diff: str | os.PathLike[str] | None = None,
                  **runner_options: Any) -> list[VerifyRow]:
    """Judge backends on any image set (with optional ground truth); the bundle is not changed."""
    from attunet_deploy.io.files import list_image_files, relative_name
    from attunet_deploy.io.images import check_held, read_file, sample_files, subsample
    from attunet_deploy.io.labels import attach_labels, check_label_shapes, match_labels
    from attunet_deploy.limits import VERIFY_IMAGES

    images, labels, max_images = image_set.images, image_set.labels, image_set.max_images
    reporter = reporter or Reporter()
    tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    max_dice_drop = check_dice_drop(max_dice_drop)
    _check_diff_target(bundle, save_diff)
    if max_dice_drop is not None and labels is None:
        raise InputError("--max-dice-drop needs ground truth: pass --labels PATH with --images")
    pairs = registry.expand(backends, precisions)
    if bundle.spatial_dims == 3:
        return _verify_volumes(bundle, images, labels, pairs, tolerances, max_dice_drop, save_diff, reporter,
                               **runner_options)
    root = Path(images)
    files = list_image_files(root)
    label_map = match_labels(files, root, labels) if labels is not None else None
    if label_map is not None:
        check_label_shapes(label_map)
    records = []
    max_images = int(VERIFY_IMAGES.value()) if max_images is None else max_images
    # Sampled by file before decoding: the command holds about max_images images, whatever the folder size.
    chosen, per_file = sample_files(files, max_images)
    total = 0
    with reporter.progress(f"Reading images from {root}", len(chosen)) as advance:
        for f in chosen:
            recs = read_file(f, bundle.in_channels, relative_name(f, root))
            total += len(recs)
            records += subsample(recs, per_file)
            del recs
            check_held(records)
            advance()
    if len(records) > max_images or len(chosen) < len(files) or total > len(records):
        records = subsample(records, max_images)
        reporter.notice("note:", f"{len(files)} file(s); judging {len(records)} evenly spaced images of them")
    masks = attach_labels(records, label_map, bundle.out_channels) if label_map is not None else None
    segmenter = Segmenter(bundle.spec)
    inputs = [segmenter.prepare(r.pixels, r.label)[0] for r in records]
    groups = group_by_shape(inputs, masks, [r.label for r in records])
    n_images = len(records)
    del records, inputs, masks  # the batches hold their own copies: keep one set of pixels, not three
    ref_backend = runnable_reference(bundle)
    cases = []
    with open_runner(bundle, ref_backend, "fp32") as ref, reporter.progress(f"Reference outputs ({ref_backend}/fp32)",
                                                       len(groups)) as advance:
        for x, y, names in groups:
            cases.append(GoldenCase(x, ref.infer(x), y, names))
            advance()
    return _judge_all(bundle, pairs, cases, tolerances, f"{ref_backend}/fp32", max_dice_drop,
                      Path(save_diff) if save_diff is not None else None, reporter,
                      f"Verifying against {ref_backend}/fp32 on {n_images} images", **runner_options)


def _verify_volumes(bundle: Bundle, images: str | os.PathLike[str], labels: str | os.PathLike[str] | None,
                    pairs: list[tuple[str, str]], tolerances: dict[str, Tolerance], max_dice_drop: float | None,
                    save_diff: str | os.PathLike[str] | None, reporter: Reporter, **runner_options: Any
                    ) -> list[VerifyRow]:
    """verify --images on a 3D bundle: whole volumes through the sliding window (judge/volumes.py)."""
    from attunet_deploy.judge.volumes import volume_cases

    ref_backend = runnable_reference(bundle)
    cases = volume_cases(bundle, images, labels, ref_backend, reporter)
    return _judge_all(bundle, pairs, cases, tolerances, f"{ref_backend}/fp32", max_dice_drop,
                      Path(save_diff) if save_diff is not None else None, reporter,
                      f"Verifying against {ref_backend}/fp32 on {len(cases)} volumes", **runner_options)


def runnable_reference(bundle: Bundle) -> str:
    """The reference backend for ``--images`` runs, or BackendUnavailable saying why none runs here."""
    ref_backend = reference_backend(bundle)
    reason = registry.check(bundle, ref_backend, "fp32")
    if reason is not None:
        raise BackendUnavailable(f"no reference can run here ({ref_backend}/fp32: {reason})")
    return ref_backend


def summary_counts(rows: Sequence[VerifyRow]) -> dict[str, int]:
    out = {str(s): 0 for s in Status}
    for r in rows:
        out[str(r.status)] += 1
    return out


__all__ = ["DEFAULT_TOLERANCES", "GoldenCase", "Tolerance", "available_backends", "compare",
           "judge", "load_golden", "run_backend", "verify", "verify_images"]
