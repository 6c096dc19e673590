"""The ``export`` step, checkpoint -> bundle: reference weights, ONNX with dynamic N/H/W, golden
set, manifest.

Everything is staged in a bundle transaction and committed only after ONNX Runtime has been
checked against PyTorch, so an export that fails or is interrupted leaves the previous bundle
byte-identical (or no bundle at all).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from attunet_deploy.build.onnx import DEFAULT_OPSET, SUPPORTED_OPSETS, add_metadata, export_onnx, reference_logits
from attunet_deploy.bundle import (
    GOLDEN_FILE,
    ONNX_FILES,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ArtifactKind,
    Bundle,
    Transaction,
    check_export_target,
    open_export_target,
)
from attunet_deploy.console import Reporter
from attunet_deploy.environment import versions
from attunet_deploy.errors import InputError, VerificationFailed
from attunet_deploy.fileio import sha256_file
from attunet_deploy.io.golden import GoldenCase, group_by_shape, model_space, non_divisible_crop, save_golden
from attunet_deploy.judge.results import Status, VerifyRow
from attunet_deploy.preprocess import default_postprocessing, parse_normalization, parse_segments
from attunet_deploy.steps.model_space import ModelSpace, demo_volumes, space_of, synthetic_volumes
from attunet_deploy.steps.volume_data import (
    UserVolumes,
    golden_volume_cases,
    golden_volumes_manifest,
    prepare_user_volumes,
)

#: ONNX Runtime must reproduce PyTorch this closely right after export.
EXPORT_REL_L2 = 1e-5


#: (N, H, W) of the golden cases for user models: batch 1 and 2, one size not divisible by 16.
GENERIC_GOLDEN = ((1, 128, 128), (2, 96, 160), (1, 90, 75))


#: Demo golden cases: phantoms at the training size, a taller size, and a non-divisible size.
DEMO_GOLDEN = ((8, 128, 128), (2, 160, 128), (4, 100, 120))


def synthetic_cases(in_channels: int, preprocessing: dict[str, Any], demo: bool
                    ) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """Golden cases when the user gave no images: demo phantoms (with labels), or smooth fields."""
    from attunet_deploy.preprocess import normalize

    cases: list[tuple[np.ndarray, np.ndarray | None, list[str]]] = []
    if demo:
        from attunet_deploy.demo import GOLDEN_SEED, make_phantoms

        for i, (n, h, w) in enumerate(DEMO_GOLDEN):
            hu, labels = make_phantoms(n, seed=GOLDEN_SEED * 100 + i, size=(h, w))
            cases.append((normalize(hu, preprocessing), labels, [f"phantom {i}.{k} ({h}x{w})" for k in range(n)]))
        return cases
    rng = np.random.default_rng(20260101)
    kind = preprocessing.get("normalize", {}).get("kind", "none")
    for i, (n, h, w) in enumerate(GENERIC_GOLDEN):
        # Smooth random fields: closer to images than white noise, so masks have structure.
        coarse = rng.standard_normal((n, in_channels, h // 8 + 2, w // 8 + 2)).astype(np.float32)
        field = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :h, :w]
        field = field + 0.3 * rng.standard_normal(field.shape).astype(np.float32)
        if kind in ("ct_window", "scale", "minmax"):
            field = (1.0 / (1.0 + np.exp(-field))).astype(np.float32)  # these normalisations produce [0, 1]
        cases.append((np.ascontiguousarray(field, dtype=np.float32), None,
                      [f"synthetic field {i}.{k} ({h}x{w})" for k in range(n)]))
    return cases


@dataclass
class UserImages:
    """The user's image set, split and read before any export work starts."""

    root: Path
    golden_files: list[Path]
    calib_files: list[Path]
    records: list[Any]
    labels: list[np.ndarray] | None
    #: for a single multi-image file: the held-out image indices (the rest calibrate)
    indices: list[int] | None = None


def prepare_user_images(images: str | os.PathLike[str], labels: str | os.PathLike[str] | None, channels: int,
                        out_channels: int) -> UserImages:
    """Split ``images`` into golden and calibration files, read the golden ones (and their labels).

    Every problem (unreadable image, image without label, label without image, shape
    mismatch) is raised here, before anything is exported.
    """
    from attunet_deploy.io.files import list_image_files, relative_name
    from attunet_deploy.io.holdout import golden_records, split_holdout, split_images
    from attunet_deploy.io.images import read_file
    from attunet_deploy.io.labels import attach_labels, check_label_shapes, match_labels

    root = Path(images)
    files = list_image_files(root)
    label_map = match_labels(files, root, labels) if labels is not None else None
    if label_map is not None:
        check_label_shapes(label_map)
    if len(files) == 1:
        # One volume or stack: hold out a quarter of its images (calibration takes the rest).
        all_records = read_file(files[0], channels, relative_name(files[0], root))
        records, rest = split_images(all_records) if len(all_records) > 1 else (all_records, [])
        golden_files, calib_files = files, files if rest else []
        indices = [r.index for r in records] if rest else None
    else:
        golden_files, calib_files = split_holdout(files, root)
        records = golden_records(golden_files, root, channels)
        indices = None
    masks = attach_labels(records, label_map, out_channels) if label_map is not None else None
    return UserImages(root, golden_files, calib_files, records, masks, indices)


def user_golden_cases(user: UserImages, preprocessing: dict[str, Any], divisor: int
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray | None, list[str]]], int]:
    """Golden cases from held-out user images (+ one crop of a real image when no image has a size
    that is not a multiple of ``divisor``); returns (cases, number of synthetic cases)."""
    inputs = [model_space(r.pixels, preprocessing, r.label) for r in user.records]
    names = [r.label for r in user.records]
    labels = list(user.labels) if user.labels is not None else None
    synthetic = 0
    if all(r.pixels.shape[1] % divisor == 0 and r.pixels.shape[2] % divisor == 0 for r in user.records):
        crop_ = non_divisible_crop(user.records[0].pixels, labels[0] if labels else None, divisor)
        if crop_ is not None:
            raw, lab = crop_
            inputs.append(model_space(raw, preprocessing, "synthetic crop"))
            names.append(f"synthetic: {raw.shape[1]}x{raw.shape[2]} crop of {user.records[0].label}")
            if labels is not None and lab is not None:
                labels.append(lab)
            synthetic = 1
    return group_by_shape(inputs, labels, names), synthetic


def golden_manifest(user: UserImages | None, demo: bool, synthetic: int, n_cases: int) -> dict[str, Any]:
    """The manifest's top-level ``golden`` record (docs/design.md section 3)."""
    from attunet_deploy.io.files import file_sha256, relative_name

    if user is None:
        return {"kind": "demo-phantoms" if demo else "synthetic-fields", "reference": "torch/fp32",
                "source": [], "synthetic_cases": n_cases, "labels": demo}
    per_file: dict[Path, list[Any]] = {}
    for r in user.records:
        per_file.setdefault(r.source, []).append(r)
    source = []
    for f in user.golden_files:
        recs = per_file.get(f, [])
        shape = list(recs[0].pixels.shape) if len(recs) == 1 else [len(recs), *recs[0].pixels.shape] if recs else []
        entry = {"file": relative_name(f, user.root), "sha256": file_sha256(f), "shape": shape, "images": len(recs)}
        if user.indices is not None:
            entry["indices"] = sorted(user.indices)
        source.append(entry)
    return {"kind": "user-images", "reference": "torch/fp32", "root": str(user.root.resolve()), "source": source,
            "synthetic_cases": synthetic, "labels": user.labels is not None,
            "calibration_candidates": len(user.calib_files)}


def check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise InputError(f"--opset {opset} unsupported: choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")


def check_rel_l2_option(check_rel_l2: float) -> None:
    if isinstance(check_rel_l2, bool) or not isinstance(check_rel_l2, (int, float)) or not math.isfinite(check_rel_l2) \
            or check_rel_l2 < 0:
        raise InputError(f"--check-rel-l2 {check_rel_l2!r}: must be a finite number >= 0")


def check_export_options(opset: int, check_rel_l2: float) -> None:
    check_opset(opset)
    check_rel_l2_option(check_rel_l2)


class Exported(NamedTuple):
    """What ``export`` committed: the bundle and the ONNX Runtime vs PyTorch parity row."""

    bundle: Bundle
    check: VerifyRow


def export_bundle(model_path: str | os.PathLike[str] | None, out: str | os.PathLike[str] = "deploy", *,
                  opset: int = DEFAULT_OPSET, trust_pickle: bool = False, force: bool = False,
                  normalize: str | None = None, exporter: str = "auto", check_rel_l2: float = EXPORT_REL_L2,
                  images: str | os.PathLike[str] | None = None, labels: str | os.PathLike[str] | None = None,
                  reporter: Reporter | None = None, arch: str | None = None, monai_args: str | None = None,
                  roi: tuple[int, ...] | None = None, overlap: float = 0.5, sw_mode: str = "gaussian",
                  spacing: tuple[float, ...] | None = None, segments: list[str] | None = None) -> Exported:
    """Export ``model_path`` (None: the bundled demo) to a verified bundle at ``out``.

    ``images`` (a file or folder) gives the golden set: a deterministic quarter is held out
    (the rest is for calibration); ``labels`` adds their ground-truth masks. Returns the
    committed bundle and its ONNX Runtime parity row. Raises VerificationFailed, with nothing
    written, when ONNX Runtime differs from PyTorch by more than ``check_rel_l2`` in relative L2.

    The model family is read from the checkpoint (``arch`` overrides it; ``monai_args`` gives MONAI
    strides). 3D families make an NCDHW bundle with the sliding window ``roi``/``overlap``/``sw_mode``
    and, if given, the voxel ``spacing`` (z, y, x mm) volumes are resampled to.
    """
    from attunet_deploy.checkpoint import load_checkpoint
    from attunet_deploy.demo import DEMO_NORMALIZE, DEMO_WEIGHTS, is_demo

    reporter = reporter or Reporter()
    check_export_options(opset, check_rel_l2)
    writes = [WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILES["fp32"], GOLDEN_FILE]
    check_export_target(out, force, writes)  # refuse a foreign folder before any work
    if labels is not None and images is None:
        raise InputError("--labels needs --images (the images the labels belong to)")
    demo = model_path is None or is_demo(model_path)
    src = Path(model_path) if model_path is not None else DEMO_WEIGHTS
    if demo and not src.is_file():
        raise InputError(f"demo weights missing at {src}: reinstall attunet-deploy or run "
                         f"'python -m attunet_deploy.demo.{'train3d' if 'oktay3d' in src.name else 'train'}'")
    preprocessing = parse_normalization(normalize if normalize is not None else (DEMO_NORMALIZE if demo else None))

    with reporter.step(f"Loading {src.name}"):
        loaded = load_checkpoint(src, trust_pickle=trust_pickle, arch=arch, monai_args=monai_args)
    for note in loaded.notes:
        reporter.notice("note:", note)
    _check_normalization_channels(preprocessing, loaded.config.in_channels)
    named = parse_segments(segments or [], loaded.config.out_channels)  # before any work, as every option
    if demo and loaded.family == "oktay3d":
        from attunet_deploy.demo import DEMO3D_ROI
        from attunet_deploy.demo.phantom3d import DEMO3D_SPACING

        roi, spacing = roi or DEMO3D_ROI, spacing or DEMO3D_SPACING
    space = space_of(loaded, roi=roi, overlap=overlap, sw_mode=sw_mode, spacing=spacing)
    if space.spacing is not None:
        preprocessing["spacing"] = space.spacing
    user: UserImages | UserVolumes | None = None
    if images is not None and space.three_d:
        with reporter.step(f"Reading held-out volumes from {images}"):
            user = prepare_user_volumes(images, labels, loaded.config.in_channels, loaded.config.out_channels)
    elif images is not None:
        with reporter.step(f"Reading held-out images from {images}"):
            user = prepare_user_images(images, labels, loaded.config.in_channels, loaded.config.out_channels)
    elif not demo:
        reporter.notice("note:", "golden set is synthetic (smooth random fields): pass --images DIR to judge "
                        "every backend on your own images")

    _root, _mode, txn = open_export_target(out, force, writes)
    with txn:
        _stage_model(txn, loaded, src, demo, preprocessing, opset, exporter, space, reporter)
        if named:
            txn.manifest["postprocessing"]["segments"] = named
        cases = _stage_golden(txn, loaded.module, loaded.config.in_channels, preprocessing, user, demo, space,
                              reporter)
        with reporter.step("Checking ONNX Runtime CPU against PyTorch"):
            from attunet_deploy.judge.verify import Tolerance, run_backend

            row = run_backend(txn.view(), "ort", "fp32", cases, Tolerance(rel_l2=check_rel_l2))
        if row.status != Status.PASS:
            raise VerificationFailed(f"ONNX Runtime differs from PyTorch: {row.get('reason') or row['status']}; "
                                     "nothing was written (--check-rel-l2 sets this check's tolerance)")
        txn.record_verification([row])
        return Exported(txn.commit(), row)


def _check_normalization_channels(preprocessing: dict[str, Any], channels: int) -> None:
    if preprocessing["normalize"]["kind"] == "mean_std":
        n_mean = len(preprocessing["normalize"]["mean"])
        n_std = len(preprocessing["normalize"]["std"])
        if n_mean not in (1, channels) or n_std not in (1, channels):
            raise InputError(f"--normalize gives {n_mean} means for a {channels}-channel model")


def _stage_model(txn: Transaction, loaded: Any, src: Path, demo: bool, preprocessing: dict[str, Any], opset: int,
                 exporter: str, space: ModelSpace, reporter: Reporter) -> None:
    """The new manifest, the reference weights (or TorchScript) and the linted FP32 ONNX, staged."""
    import torch

    from attunet_deploy.build.trt_lint import lint_onnx
    from attunet_deploy.checkpoint import save_checkpoint
    from attunet_deploy.models.attunet2d import count_parameters

    config = loaded.config
    source = {"path": str(src.resolve()), "sha256": sha256_file(src), "layout": loaded.source,
              "demo": demo, "parameters": count_parameters(loaded.module)}
    txn.manifest = Bundle.new_manifest(config=config.to_dict(), preprocessing=preprocessing,
                                       postprocessing=default_postprocessing(config.out_channels), source=source,
                                       spatial_divisor=space.spatial_divisor, family=loaded.family,
                                       sliding_window=space.sliding_window)
    producer = versions(include_torch=True)
    if loaded.is_reference:
        save_checkpoint(loaded.module, txn.stage(WEIGHTS_FILE), meta={"source": src.name})
        txn.add_artifact(WEIGHTS_FILE, kind=ArtifactKind.WEIGHTS, precision="fp32", producer=producer)
    else:
        scripted = loaded.module if isinstance(loaded.module, torch.jit.ScriptModule) else \
            torch.jit.trace(loaded.module, torch.zeros(1, config.in_channels, 64, 64))
        torch.jit.save(scripted, str(txn.stage(TORCHSCRIPT_FILE)))
        txn.add_artifact(TORCHSCRIPT_FILE, kind=ArtifactKind.TORCHSCRIPT, precision="fp32", producer=producer)
    onnx_path = txn.stage(ONNX_FILES["fp32"])
    axes = "N/D/H/W" if space.three_d else "N/H/W"
    with reporter.step(f"Exporting ONNX (opset {opset}, dynamic {axes})"):
        info = export_onnx(loaded.module, config.in_channels, onnx_path, opset=opset, exporter=exporter,
                           divisors=space.divisors)
        add_metadata(onnx_path, {"attunet_deploy.config": json.dumps(config.to_dict()),
                                 "attunet_deploy.family": loaded.family,
                                 "attunet_deploy.spatial_divisor": json.dumps(space.spatial_divisor),
                                 "attunet_deploy.preprocessing": json.dumps(preprocessing)})
    if info["fallback_reasons"]:
        reporter.notice("note:", f"used the {info['exporter']} exporter ({'; '.join(info['fallback_reasons'])})")
    lint = lint_onnx(onnx_path)
    if lint:
        reporter.notice("TensorRT lint (fp32):", "; ".join(lint[:5]))
    txn.add_artifact(ONNX_FILES["fp32"], kind=ArtifactKind.ONNX, precision="fp32",
                     producer={**producer, "exporter": info["exporter"], "opset": opset}, trt_lint=lint)


def _stage_golden(txn: Transaction, module: Any, in_channels: int, preprocessing: dict[str, Any],
                  user: UserImages | UserVolumes | None, demo: bool, space: ModelSpace, reporter: Reporter
                  ) -> list[GoldenCase]:
    """golden.npz: held-out user images (or synthetic cases) with PyTorch FP32 logits, staged."""
    if isinstance(user, UserVolumes):
        assert space.sliding_window is not None  # volumes are read for 3D models only
        groups, synthetic = golden_volume_cases(user, preprocessing, space.sliding_window["roi"]), 0
    elif user is not None:
        groups, synthetic = user_golden_cases(user, preprocessing, space.divisors[-1])
    elif space.three_d:
        groups = demo_volumes(preprocessing) if demo else synthetic_volumes(in_channels, preprocessing, space.divisors)
        synthetic = 0
    else:
        groups, synthetic = synthetic_cases(in_channels, preprocessing, demo), 0
    cases: list[GoldenCase] = []
    with reporter.progress("Computing PyTorch FP32 golden outputs", len(groups)) as advance:
        for x, y, names in groups:
            cases.append(GoldenCase(x, reference_logits(module, x, space.divisors), y, names))
            advance()
    with open(txn.stage(GOLDEN_FILE), "wb") as fh:
        save_golden(fh, cases)
    txn.add_artifact(GOLDEN_FILE, kind=ArtifactKind.GOLDEN, producer=versions(include_torch=True),
                     shapes=[list(c.inputs.shape) for c in cases])
    if isinstance(user, UserVolumes):
        assert space.sliding_window is not None
        txn.manifest["golden"] = golden_volumes_manifest(user, space.sliding_window["roi"])
    else:
        txn.manifest["golden"] = golden_manifest(user, demo, synthetic if user is not None else len(cases),
                                                 len(cases))
    return cases
