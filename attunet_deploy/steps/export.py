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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from attunet_deploy.build.onnx import DEFAULT_OPSET, SUPPORTED_OPSETS, add_metadata, export_onnx, reference_logits
from attunet_deploy.bundle import (
    GOLDEN_FILE,
    ONNX_FILES,
    SELFCHECK_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ArtifactKind,
    Bundle,
    Transaction,
    check_export_target,
    open_export_target,
)
from attunet_deploy.bundle.profile import InputProfile
from attunet_deploy.bundle.spec import InputSpec, ModelSpec, Normalization, Postprocessing, Segment
from attunet_deploy.console import Reporter
from attunet_deploy.environment import versions
from attunet_deploy.errors import InputError, VerificationFailed
from attunet_deploy.fileio import sha256_file
from attunet_deploy.io.golden import GoldenCase, group_by_shape, non_divisible_crop, save_golden
from attunet_deploy.judge.results import Status, VerifyRow
from attunet_deploy.preprocess import parse_segments
from attunet_deploy.segmenter import Segmenter
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


def synthetic_cases(segmenter: Segmenter, demo: bool) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """Golden cases when the user gave no images: demo phantoms (with labels), or smooth fields."""
    cases: list[tuple[np.ndarray, np.ndarray | None, list[str]]] = []
    if demo:
        from attunet_deploy.demo import GOLDEN_SEED, make_phantoms

        for i, (n, h, w) in enumerate(DEMO_GOLDEN):
            hu, labels = make_phantoms(n, seed=GOLDEN_SEED * 100 + i, size=(h, w))
            cases.append((segmenter.normalize(hu), labels, [f"phantom {i}.{k} ({h}x{w})" for k in range(n)]))
        return cases
    rng = np.random.default_rng(20260101)
    in_channels = segmenter.channels
    for i, (n, h, w) in enumerate(GENERIC_GOLDEN):
        # Smooth random fields: closer to images than white noise, so masks have structure.
        coarse = rng.standard_normal((n, in_channels, h // 8 + 2, w // 8 + 2)).astype(np.float32)
        field = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :h, :w]
        field = field + 0.3 * rng.standard_normal(field.shape).astype(np.float32)
        if segmenter.spec.normalization.unit_range:
            field = (1.0 / (1.0 + np.exp(-field))).astype(np.float32)  # as the normalised images: in [0, 1]
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


def user_golden_cases(user: UserImages, segmenter: Segmenter
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray | None, list[str]]], int]:
    """Golden cases from held-out user images (+ one crop of a real image when no image has a size
    that is not a multiple of the divisor); returns (cases, number of synthetic cases)."""
    divisor = segmenter.spec.input.divisor
    inputs = [segmenter.prepare(r.pixels, r.label)[0] for r in user.records]
    names = [r.label for r in user.records]
    labels = list(user.labels) if user.labels is not None else None
    synthetic = 0
    if all(r.pixels.shape[1] % divisor == 0 and r.pixels.shape[2] % divisor == 0 for r in user.records):
        crop_ = non_divisible_crop(user.records[0].pixels, labels[0] if labels else None, divisor)
        if crop_ is not None:
            raw, lab = crop_
            inputs.append(segmenter.prepare(raw, "synthetic crop")[0])
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


@dataclass(frozen=True)
class ExportSettings:
    """What ``export`` makes of which checkpoint, checked here once (each problem names its field).

    ``model`` None is the bundled demo. ``images`` (a file or folder) gives the golden set: a
    deterministic quarter is held out (the rest is for calibration); ``labels`` adds their
    ground-truth masks. ``arch`` overrides the family read from the checkpoint; ``monai_args`` gives
    MONAI strides. 3D families take the sliding window ``roi``/``overlap``/``sw_mode`` and the voxel
    ``spacing`` (z, y, x mm) volumes are resampled to. ``segments`` name classes in DICOM outputs
    (``CLASS=LABEL[@SCHEME:CODE:MEANING][#RRGGBB]``). ONNX Runtime must match PyTorch within
    ``check_rel_l2``. Post-processing that becomes part of the model: ``keep_largest`` ("all" or
    class numbers "1,3") keeps each named class's largest connected component; ``min_component_ml``
    removes smaller components (3D bundles with a spacing).
    """

    model: str | os.PathLike[str] | None = None
    out: str | os.PathLike[str] = "deploy"
    opset: int = DEFAULT_OPSET
    trust_pickle: bool = False
    force: bool = False
    normalize: str | None = None
    exporter: str = "auto"
    check_rel_l2: float = EXPORT_REL_L2
    images: str | os.PathLike[str] | None = None
    labels: str | os.PathLike[str] | None = None
    arch: str | None = None
    monai_args: str | None = None
    roi: tuple[int, ...] | None = None
    overlap: float = 0.5
    sw_mode: str = "gaussian"
    spacing: tuple[float, ...] | None = None
    segments: tuple[str, ...] = ()
    keep_largest: str | None = None
    min_component_ml: float | None = None

    def __post_init__(self) -> None:
        if self.opset not in SUPPORTED_OPSETS:
            raise InputError(f"opset {self.opset} unsupported: choose {SUPPORTED_OPSETS.start}.."
                             f"{SUPPORTED_OPSETS.stop - 1}", field="opset")
        v = self.check_rel_l2
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"the export check's rel L2 tolerance {v!r} must be a finite number >= 0",
                             field="check_rel_l2")
        if self.labels is not None and self.images is None:
            raise InputError("labels need the images they belong to", field="labels")
        if self.exporter not in ("auto", "dynamo", "torchscript"):
            raise InputError(f"exporter {self.exporter!r}: auto, dynamo or torchscript", field="exporter")
        Normalization.parse(self.normalize)  # a bad spec fails here, before any work
        Postprocessing(min_component_ml=self.min_component_ml)  # its range check
        if self.keep_largest is not None and self.keep_largest != "all" and not all(
                p.strip().isdigit() for p in self.keep_largest.split(",")):
            raise InputError(f"keep-largest {self.keep_largest!r}: all, or class numbers such as 1,2",
                             field="keep_largest")

    def cleanup(self, cout: int, spec_3d_spacing: bool) -> tuple[tuple[int, ...], float | None]:
        """(classes to keep the largest component of, smallest component ml) for a model with ``cout``
        output channels."""
        top = 1 if cout <= 2 else cout - 1
        classes: tuple[int, ...] = ()
        if self.keep_largest is not None:
            classes = tuple(range(1, top + 1)) if self.keep_largest == "all" else \
                tuple(sorted({int(p) for p in self.keep_largest.split(",")}))
            if any(not 1 <= c <= top for c in classes):
                raise InputError(f"keep-largest {self.keep_largest!r}: this model's classes are 1..{top}",
                                 field="keep_largest")
        if self.min_component_ml is not None and not spec_3d_spacing:
            raise InputError("a smallest component in ml needs a 3D model with a voxel spacing (give --spacing)",
                             field="min_component_ml")
        return classes, self.min_component_ml

    @property
    def demo(self) -> bool:
        from attunet_deploy.demo import is_demo

        return self.model is None or is_demo(self.model)


class Exported(NamedTuple):
    """What ``export`` committed: the bundle and the ONNX Runtime vs PyTorch parity row."""

    bundle: Bundle
    check: VerifyRow


#: What export writes into a bundle (a foreign folder is refused before any work).
EXPORT_WRITES = [WEIGHTS_FILE, TORCHSCRIPT_FILE, ONNX_FILES["fp32"], GOLDEN_FILE, SELFCHECK_FILE]


def export_bundle(settings: ExportSettings, reporter: Reporter | None = None) -> Exported:
    """Export ``settings.model`` to a verified bundle at ``settings.out`` (see :class:`ExportSettings`).

    Returns the committed bundle and its ONNX Runtime parity row. Raises VerificationFailed, with
    nothing written, when ONNX Runtime differs from PyTorch by more than ``check_rel_l2`` in relative L2.
    """
    from attunet_deploy.checkpoint import load_checkpoint
    from attunet_deploy.demo import DEMO_NORMALIZE, DEMO_WEIGHTS

    reporter = reporter or Reporter()
    s = settings
    check_export_target(s.out, s.force, EXPORT_WRITES)  # refuse a foreign folder before any work
    demo = s.demo
    src = Path(s.model) if s.model is not None else DEMO_WEIGHTS
    if demo and not src.is_file():
        raise InputError(f"demo weights missing at {src}: reinstall attunet-deploy or run "
                         f"'python -m attunet_deploy.demo.{'train3d' if 'oktay3d' in src.name else 'train'}'")
    normalization = Normalization.parse(s.normalize if s.normalize is not None else (DEMO_NORMALIZE if demo else None))
    with reporter.step(f"Loading {src.name}"):
        loaded = load_checkpoint(src, trust_pickle=s.trust_pickle, arch=s.arch, monai_args=s.monai_args)
    for note in loaded.notes:
        reporter.notice("note:", note)
    cin, cout = loaded.config.in_channels, loaded.config.out_channels
    if normalization.kind == "mean_std" and (len(normalization.mean) not in (1, cin)
                                             or len(normalization.std) not in (1, cin)):
        raise InputError(f"the normalisation gives {len(normalization.mean)} means for a {cin}-channel model",
                         field="normalize")
    named = parse_segments(s.segments, cout)  # before any work, as every option
    if demo and not named:  # the demo is the paper's pancreas task; a user's model stays neutral ("Organ")
        named = (Segment(1, "Pancreas", ("SCT", "15776009", "Pancreas")),)
    roi, spacing = s.roi, s.spacing
    if demo and loaded.family == "oktay3d":
        from attunet_deploy.demo import DEMO3D_ROI
        from attunet_deploy.demo.phantom3d import DEMO3D_SPACING

        roi, spacing = roi or DEMO3D_ROI, spacing or DEMO3D_SPACING
    space = space_of(loaded, roi=roi, overlap=s.overlap, sw_mode=s.sw_mode, spacing=spacing)
    keep, smallest = s.cleanup(cout, space.three_d and space.spacing is not None)
    spec = ModelSpec(InputSpec(cin, cout, space.layout, space.divisors), normalization,
                     replace(Postprocessing.default(cout), segments=named, keep_largest=keep,
                             min_component_ml=smallest),
                     space.sliding_window, space.spacing)
    user = _read_user_images(s, space, cin, cout, demo, reporter)
    _root, _mode, txn = open_export_target(s.out, s.force, EXPORT_WRITES)
    with txn:
        _stage_model(txn, loaded, src, demo, spec, s, reporter)
        cases = _stage_golden(txn, loaded.module, Segmenter(spec), user, demo, reporter)
        with reporter.step("Checking ONNX Runtime CPU against PyTorch"):
            from attunet_deploy.judge.verify import Tolerance, run_backend

            row = run_backend(txn.view(), "ort", "fp32", cases, Tolerance(rel_l2=s.check_rel_l2))
        if row.status != Status.PASS:
            raise VerificationFailed(f"ONNX Runtime differs from PyTorch: {row.reason or row.status}; "
                                     "nothing was written (--check-rel-l2 sets this check's tolerance)")
        txn.record_verification([row])
        return Exported(txn.commit(), row)


def _read_user_images(s: ExportSettings, space: ModelSpace, cin: int, cout: int, demo: bool, reporter: Reporter
                      ) -> UserImages | UserVolumes | None:
    """The user's held-out images (or volumes), read before any export work starts."""
    if s.images is not None and space.three_d:
        with reporter.step(f"Reading held-out volumes from {s.images}"):
            return prepare_user_volumes(s.images, s.labels, cin, cout)
    if s.images is not None:
        with reporter.step(f"Reading held-out images from {s.images}"):
            return prepare_user_images(s.images, s.labels, cin, cout)
    if not demo:
        reporter.notice("note:", "golden set is synthetic (smooth random fields): pass --images DIR to judge "
                        "every backend on your own images")
    return None


def _stage_model(txn: Transaction, loaded: Any, src: Path, demo: bool, spec: ModelSpec, s: ExportSettings,
                 reporter: Reporter) -> None:
    """The new manifest, the reference weights (or TorchScript) and the linted FP32 ONNX, staged."""
    import torch

    from attunet_deploy.build.trt_lint import lint_onnx
    from attunet_deploy.checkpoint import save_checkpoint
    from attunet_deploy.models.attunet2d import count_parameters

    config = loaded.config
    source = {"path": str(src.resolve()), "sha256": sha256_file(src), "layout": loaded.source,
              "demo": demo, "parameters": count_parameters(loaded.module)}
    txn.manifest = Bundle.new_manifest(config=config.to_dict(), spec=spec, source=source, family=loaded.family)
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
    axes = "N/D/H/W" if spec.sliding_window is not None else "N/H/W"
    divisors = spec.input.divisors
    with reporter.step(f"Exporting ONNX (opset {s.opset}, dynamic {axes})"):
        info = export_onnx(loaded.module, config.in_channels, onnx_path, opset=s.opset, exporter=s.exporter,
                           divisors=divisors)
        preprocessing: dict[str, object] = {"normalize": spec.normalization.to_dict()}
        if spec.spacing is not None:
            preprocessing["spacing"] = list(spec.spacing)
        add_metadata(onnx_path, {"attunet_deploy.config": json.dumps(config.to_dict()),
                                 "attunet_deploy.family": loaded.family,
                                 "attunet_deploy.spatial_divisor": json.dumps(
                                     list(divisors) if len(divisors) == 3 else divisors[-1]),
                                 "attunet_deploy.preprocessing": json.dumps(preprocessing)})
    if info["fallback_reasons"]:
        reporter.notice("note:", f"used the {info['exporter']} exporter ({'; '.join(info['fallback_reasons'])})")
    lint = lint_onnx(onnx_path)
    if lint:
        reporter.notice("TensorRT lint (fp32):", "; ".join(lint[:5]))
    txn.add_artifact(ONNX_FILES["fp32"], kind=ArtifactKind.ONNX, precision="fp32",
                     producer={**producer, "exporter": info["exporter"], "opset": s.opset}, trt_lint=lint)


def _stage_golden(txn: Transaction, module: Any, segmenter: Segmenter, user: UserImages | UserVolumes | None,
                  demo: bool, reporter: Reporter) -> list[GoldenCase]:
    """golden.npz: held-out user images (or synthetic cases) with PyTorch FP32 logits, staged."""
    spec = segmenter.spec
    window = spec.sliding_window
    if isinstance(user, UserVolumes):
        assert window is not None  # volumes are read for 3D models only
        groups, synthetic = golden_volume_cases(user, segmenter), 0
    elif user is not None:
        groups, synthetic = user_golden_cases(user, segmenter)
    elif window is not None:
        groups = demo_volumes(segmenter) if demo else synthetic_volumes(spec.input.channels, spec.normalization,
                                                                        spec.input.divisors)
        synthetic = 0
    else:
        groups, synthetic = synthetic_cases(segmenter, demo), 0
    cases: list[GoldenCase] = []
    with reporter.progress("Computing PyTorch FP32 golden outputs", len(groups)) as advance:
        for x, y, names in groups:
            cases.append(GoldenCase(x, reference_logits(module, x, segmenter), y, names))
            advance()
    with open(txn.stage(GOLDEN_FILE), "wb") as fh:
        save_golden(fh, cases)
    _stage_selfcheck(txn, module, segmenter, cases[0])
    txn.add_artifact(GOLDEN_FILE, kind=ArtifactKind.GOLDEN, producer=versions(include_torch=True),
                     shapes=[list(c.inputs.shape) for c in cases])
    if isinstance(user, UserVolumes):
        assert window is not None
        txn.set_golden(golden_volumes_manifest(user, list(window.roi)))
    else:
        txn.set_golden(golden_manifest(user, demo, synthetic if user is not None else len(cases), len(cases)))
    txn.set_input_profile(_golden_profile(user, demo, segmenter, cases).to_dict())
    return cases


def _stage_selfcheck(txn: Transaction, module: Any, segmenter: Segmenter, case: GoldenCase) -> None:
    """selfcheck.npz: the input every runner checks itself on before its first answer
    (runtimes/selfcheck.py): a golden image (2D), or one window of a golden volume (3D, padded to
    the window where the volume is thinner), with its PyTorch FP32 logits."""
    from attunet_deploy.runtimes.selfcheck import save_selfcheck
    from attunet_deploy.steps.volume_data import window_box

    window = segmenter.spec.sliding_window
    if window is None:
        x, y = case.inputs[:1], case.logits[:1]
    else:
        vol = case.inputs[:1]
        grow = [(0, 0), (0, 0)] + [(0, max(r - s, 0)) for r, s in zip(window.roi, vol.shape[2:])]
        vol = np.pad(vol, grow) if any(g != (0, 0) for g in grow) else vol
        box = (slice(None), slice(None), *window_box(vol.shape[2:], window.roi))
        x = np.ascontiguousarray(vol[box])
        y = reference_logits(module, x, segmenter)
    with open(txn.stage(SELFCHECK_FILE), "wb") as fh:
        save_selfcheck(fh, x, y)
    txn.add_artifact(SELFCHECK_FILE, kind=ArtifactKind.SELFCHECK, producer=versions(include_torch=True),
                     shapes=[list(x.shape)])


def _golden_profile(user: UserImages | UserVolumes | None, demo: bool, segmenter: Segmenter,
                    cases: list[GoldenCase]) -> InputProfile:
    """What the golden images looked like (raw), with the reference's masks of them."""
    from attunet_deploy.steps import profile

    if isinstance(user, UserVolumes):  # golden volumes are windows of them: no whole-volume segment sizes
        vols = user.volumes
        spaced = [v.spacing for v in vols if v.spacing is not None]
        return profile.measure([v.voxels for v in vols], [], segmenter, volume=True,
                               pixel_spacing=[(s[1], s[2]) for s in spaced] if len(spaced) == len(vols) else (),
                               slice_thickness=[s[0] for s in spaced], source=f"{len(vols)} golden volume(s)")
    by_name = {n: m for c in cases for n, m in zip(c.image_names(), segmenter.masks(c.logits))}
    if user is not None:
        recs = [r for r in user.records if r.label in by_name]
        return profile.of_records(recs, [by_name[r.label] for r in recs], segmenter,
                                  f"{len(recs)} golden image(s) from {user.root.name}")
    if not demo:
        return InputProfile()  # synthetic fields tell nothing about the images the model will meet
    if segmenter.spec.sliding_window is not None:
        from attunet_deploy.demo import GOLDEN_SEED
        from attunet_deploy.demo.phantom3d import make_volumes

        hu, _ = make_volumes(8, seed=GOLDEN_SEED)
        return profile.demo_profile(segmenter, list(hu), list(segmenter.masks(cases[0].logits)))
    from attunet_deploy.demo import GOLDEN_SEED, make_phantoms

    raws = [img for i, (n, h, w) in enumerate(DEMO_GOLDEN)
            for img in make_phantoms(n, seed=GOLDEN_SEED * 100 + i, size=(h, w))[0]]
    return profile.demo_profile(segmenter, raws, [m for c in cases for m in segmenter.masks(c.logits)])
