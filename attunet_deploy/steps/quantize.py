"""The ``quantize`` step: FP16 and INT8 graphs built from the bundle's FP32 ONNX and a calibration
set that never overlaps the held-out golden images, linted for TensorRT, verified on ONNX
Runtime CPU, and committed together (or nothing is written).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from attunet_deploy.build.fp16 import check_node_names, convert_fp16
from attunet_deploy.build.int8 import METHODS, calibrate, quantize_int8
from attunet_deploy.build.int8_search import accuracy_aware_int8
from attunet_deploy.bundle import ENGINE_DIR, ONNX_FILES, OV_INT8_BIN, OV_INT8_XML, ArtifactKind, Bundle
from attunet_deploy.bundle.profile import InputProfile
from attunet_deploy.console import Reporter
from attunet_deploy.environment import versions
from attunet_deploy.errors import InputError, VerificationFailed
from attunet_deploy.io.golden import GoldenCase
from attunet_deploy.judge.results import Status, VerifyRow
from attunet_deploy.segmenter import Segmenter


# ------------------------------------------------------------------------------------ bundle step
class Calibration(NamedTuple):
    """Model-space calibration inputs, a description, the files used, and the input profile of the
    calibration images (empty where they are phantoms or 3D windows) that widens the bundle's."""

    inputs: list[np.ndarray]
    described: str
    used: list[str]
    profile: InputProfile = InputProfile()


def calibration_inputs(bundle: Bundle, calib: str | None, max_samples: int) -> Calibration:
    """Model-space calibration inputs, a description, the calibration files (relative names) and
    their input profile.

    Files whose content is one of the held-out golden images are never used for calibration,
    whatever folder they come from: calibration and verification stay disjoint.
    """
    from attunet_deploy.io.files import file_sha256, list_image_files, relative_name
    from attunet_deploy.io.images import check_held, model_inputs, read_file, sample_files, subsample

    if bundle.spatial_dims == 3:
        return _calibration_volumes(bundle, calib, max_samples)
    segmenter = Segmenter(bundle.spec)
    golden = bundle.golden
    if calib is None:
        held_root = golden.root if golden.kind == "user-images" else None
        if held_root is not None and Path(held_root).exists():
            calib = held_root  # the images export held out a quarter of; the rest calibrate
        elif not bundle.is_demo:
            raise InputError("INT8 needs calibration images for a user model: pass --calib DIR_OR_FILE "
                             "(a few dozen representative slices)")
        else:
            from attunet_deploy.demo import CALIB_SEED, DEMO_SIZE, make_phantoms

            hu, _ = make_phantoms(max_samples, seed=CALIB_SEED, size=DEMO_SIZE)
            x = segmenter.normalize(hu)
            return Calibration([x[i:i + 1] for i in range(len(x))], f"{max_samples} demo phantoms (seed {CALIB_SEED})",
                               [f"demo phantom seed {CALIB_SEED}"])
    root = Path(calib)
    files = list_image_files(root)
    held = golden.held_out()
    records = []
    skipped = 0
    usable = []
    for f in files:  # hashing streams the file; nothing is decoded yet
        sha = file_sha256(f) if held else ""
        if sha in held and held[sha] is None:
            skipped += 1
            continue
        usable.append((f, sha))
    # Sampled by file before decoding: about max_samples images are ever held, whatever the folder size.
    chosen, per_file = sample_files([f for f, _ in usable], max_samples)
    shas = dict(usable)
    for f in chosen:
        recs = read_file(f, bundle.in_channels, relative_name(f, root))
        sha = shas[f]
        if sha in held:  # a volume part of which is held out: only its other slices calibrate
            recs = [r for r in recs if r.index not in (held[sha] or set())]
            skipped += 1
        records += subsample(recs, per_file)
        del recs
        check_held(records)
    if not records:
        raise InputError(f"every image in {calib} is a held-out golden image: calibration needs other images "
                         "(give a larger --calib set)")
    records = subsample(records, max_samples)
    used_files = sorted({r.rel for r in records})
    described = f"{len(records)} images from {calib}" + (f" (held-out golden images excluded from {skipped} "
                                                          "file(s))" if skipped else "")
    from attunet_deploy.steps.profile import of_records

    # Intensities and spacings only: calibration images have no reference masks to size segments by.
    profile = of_records(records, [], segmenter, f"{len(records)} calibration images")
    return Calibration(model_inputs(records, segmenter), described, used_files, profile)


def evaluate_int8(path: Path, cases: list[GoldenCase], segmenter: Segmenter, threads: int = 0
                  ) -> tuple[float, float]:
    """(mean Dice vs the golden reference, p50 latency in ms on the first case) of an INT8 graph on
    ONNX Runtime CPU, padded and masked by the bundle's Segmenter."""
    import onnxruntime as ort

    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, compare

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def run(xp: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {"image": xp})[0])

    outs = [segmenter.infer_volume(run, c.inputs) if c.volume else segmenter.infer(run, c.inputs) for c in cases]
    row = compare(outs, cases, segmenter, DEFAULT_TOLERANCES["int8"])
    xp, _ = segmenter.pad(cases[0].inputs)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sess.run(None, {"image": xp})
        times.append(time.perf_counter() - t0)
    return float(row.mean_dice or 0.0), 1000.0 * float(np.median(times))


def _calibration_volumes(bundle: Bundle, calib: str | None, max_samples: int) -> Calibration:
    """3D bundles: roi-sized patches of the calibration volumes (never a held-out golden volume)."""
    from attunet_deploy.io.volumes import list_volumes, volume_sha256
    from attunet_deploy.steps.volume_data import calibration_patches

    segmenter = Segmenter(bundle.spec)
    if calib is None and bundle.is_demo:
        from attunet_deploy.demo import CALIB_SEED
        from attunet_deploy.demo.phantom3d import make_volumes

        hu, _ = make_volumes(max(1, min(max_samples, 8)), seed=CALIB_SEED)
        x = segmenter.normalize(hu)
        return Calibration([x[i:i + 1] for i in range(len(x))], f"{len(x)} demo phantom volumes (seed {CALIB_SEED})",
                           [f"demo phantom volumes seed {CALIB_SEED}"])
    if calib is None:
        root = bundle.golden.root if bundle.golden.kind == "user-volumes" else None
        if not root or not Path(root).exists():
            raise InputError("INT8 for a 3D model needs calibration volumes: pass --calib DIR_OR_FILE (NIfTI or .npy "
                             "volumes; a few are enough, several windows are taken from each)")
        calib = root
    held = bundle.golden.held_out()
    files = [f for f in list_volumes(calib) if not held or volume_sha256(f) not in held]
    if not files:
        raise InputError(f"every volume in {calib} is a held-out golden volume: calibration needs other volumes "
                         "(give a larger --calib set)")
    inputs, used = calibration_patches(files, segmenter, max_samples)
    # A 3D model resamples to its own spacing and sees windows: the golden volumes' profile stands.
    return Calibration(inputs, f"{len(inputs)} windows of {len(used)} volume(s) from {calib}", used)


#: ``quantize --target``: which INT8 graphs to write (``ATTDEPLOY_INT8_TARGET`` gives the default).
TARGETS = ("all", "onnx", "openvino")


def int8_target(target: str | None, bundle: Bundle, precisions: list[str]) -> str:
    """The INT8 graphs to write; ``openvino`` where that graph cannot be made is refused before any work."""
    import os

    chosen = target or os.environ.get("ATTDEPLOY_INT8_TARGET", "all") or "all"
    if chosen not in TARGETS:
        raise InputError(f"ATTDEPLOY_INT8_TARGET={chosen!r}: choose {', '.join(TARGETS)} (onnx: the Q/DQ graph only; "
                         "all: also NNCF's OpenVINO graph when OpenVINO is installed; openvino: that graph or an "
                         "error)")
    if chosen == "openvino" and "int8" in precisions:
        from attunet_deploy.build.ov_int8 import nncf_available

        if not nncf_available():
            raise InputError("--target openvino: OpenVINO and NNCF cannot be imported here (pip install "
                             "'attunet-deploy[openvino]'; 'attdeploy doctor' shows why)")
    return chosen


def _dice_target(bundle: Bundle, max_dice_drop: float) -> Any:
    """The golden set as NNCF's accuracy-control data: one padded image and reference mask each.
    Whole golden volumes (3D, judged through the sliding window) are left out: one forward pass
    over them is not what the reference did. None when nothing is left (the verification after
    NNCF still holds the graph to the target)."""
    from attunet_deploy.build.ov_int8 import DiceTarget
    from attunet_deploy.io.golden import load_golden

    segmenter = Segmenter(bundle.spec)
    images, refs = [], []
    for case in load_golden(bundle):
        if case.volume:
            continue
        for i in range(len(case.inputs)):
            images.append(segmenter.pad(np.ascontiguousarray(case.inputs[i:i + 1], np.float32)))
            refs.append(segmenter.masks(case.logits[i:i + 1]))
    return DiceTarget(images, refs, segmenter, max_dice_drop) if images else None


def _stage_openvino_int8(bundle: Bundle, txn: Any, src: Path, inputs: list[np.ndarray], ignored: list[str],
                         target: str, max_dice_drop: float | None, calibration: dict[str, str | list[str]],
                         reporter: Reporter) -> None:
    """NNCF's OpenVINO-native INT8 graph beside the Q/DQ one (OpenVINO and NNCF installed,
    ``target`` not ``onnx``; with ``max_dice_drop``, NNCF's accuracy control), judged on the golden set
    on OpenVINO: kept only if it passes the INT8 tolerance (and the Dice target). ``target``
    ``openvino`` makes a graph that cannot be made or kept an error. An earlier one is dropped
    whenever the INT8 graph is rewritten."""
    from attunet_deploy.build.ov_int8 import nncf_available, quantize_openvino

    for old in (OV_INT8_XML, OV_INT8_BIN):
        if bundle.has(old):
            txn.remove(old)
    if target == "onnx" or not nncf_available():  # "openvino" without them was refused before any work
        return
    if bundle.spatial_dims == 3:  # the grid gates' theta convs stay in float in NNCF's graph (build/onnx.py)
        from attunet_deploy.build.onnx import subsampling_convs

        ignored = [*ignored, *[n for n in subsampling_convs(src) if n not in ignored]]
    try:
        label = "with accuracy control" if max_dice_drop is not None else "INT8 IR"
        with reporter.step(f"Quantising for OpenVINO with NNCF ({label})"):
            info = quantize_openvino(src, txn.stage(OV_INT8_XML), txn.stage(OV_INT8_BIN), inputs, ignored,
                                     None if max_dice_drop is None else _dice_target(bundle, max_dice_drop))
    except Exception as exc:  # an optional extra graph: its failure must not cost the Q/DQ graph
        _refuse_ov_int8(txn, target, reporter, f"NNCF could not quantise for OpenVINO ({type(exc).__name__}: "
                        f"{str(exc)[:160]})")
        return
    txn.add_artifact(OV_INT8_XML, kind=ArtifactKind.OPENVINO_IR, precision="int8",
                     producer={**versions(), **info, **calibration, "weights": OV_INT8_BIN})
    txn.add_artifact(OV_INT8_BIN, kind=ArtifactKind.OPENVINO_WEIGHTS, precision="int8")
    from attunet_deploy.judge.verify import verify as run_verify

    (row,) = run_verify(txn.view(), ["ov"], ["int8"], reporter=reporter)
    if row.status != Status.PASS:
        _refuse_ov_int8(txn, target, reporter, f"NNCF's INT8 graph missed the INT8 tolerance on OpenVINO "
                        f"({row.reason})")
    elif max_dice_drop is not None and not (row.mean_dice or 0.0) >= 1.0 - max_dice_drop:
        _refuse_ov_int8(txn, target, reporter, f"NNCF's accuracy control left mean Dice {row.mean_dice or 0.0:.4f} "
                        f"< {1.0 - max_dice_drop:.4f} on OpenVINO")


def _refuse_ov_int8(txn: Any, target: str, reporter: Reporter, why: str) -> None:
    for name in (OV_INT8_XML, OV_INT8_BIN):
        txn.remove(name)
    if target == "openvino":
        raise VerificationFailed(f"--target openvino: {why}; nothing was written")
    reporter.notice("note:", f"{why}: not kept; ov/int8 runs the Q/DQ graph")


@dataclass(frozen=True)
class QuantizeSettings:
    """What ``quantize`` makes, checked here once (each problem names its field).

    ``precisions``: fp16 and/or int8. INT8 is calibrated (``method``: entropy, percentile, minmax) on at
    most ``max_samples`` images of ``calib`` (default: the images export held out a quarter of, or the
    demo's phantoms). ``quantize_all`` also quantises the gates' psi and the head; ``full_range_weights``
    uses 8-bit weights (GPU-only targets); ``fp16_keep_fp32`` names ONNX nodes kept in float32 in the FP16
    graph. ``max_dice_drop`` makes INT8 accuracy-aware (``allow_float`` keeps a result with every
    convolution in float). ``target``: which INT8 graphs (onnx, openvino,
    all; None: ``$ATTDEPLOY_INT8_TARGET`` or all). ``verify``: check the graphs on ONNX Runtime first.
    """

    calib: str | None = None
    method: str = "percentile"
    max_samples: int = 64
    quantize_all: bool = False
    precisions: tuple[str, ...] = ("fp16", "int8")
    verify: bool = True
    full_range_weights: bool = False
    fp16_keep_fp32: tuple[str, ...] = ()
    max_dice_drop: float | None = None
    target: str | None = None
    #: keep an accuracy-aware "INT8" graph that ended with every convolution in float
    allow_float: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown calibration method {self.method!r}; choose {', '.join(METHODS)}",
                             field="method")
        n = self.max_samples
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000:
            raise InputError(f"calibration samples {n!r}: must be an integer in 1..100000", field="max_samples")
        bad = [p for p in self.precisions if p not in ("fp16", "int8")]
        if bad or not self.precisions:
            raise InputError(f"precision {bad[0] if bad else 'none'!r}: quantize makes fp16 and int8",
                             field="precisions")
        if self.max_dice_drop is not None:
            from attunet_deploy.judge.verify import check_dice_drop

            check_dice_drop(self.max_dice_drop)
            if "int8" not in self.precisions:
                raise InputError("a largest Dice drop drives accuracy-aware INT8 (convolutions return to float until "
                                 "the Dice target holds); it does nothing for FP16: add int8 or drop it",
                                 field="max_dice_drop")
        if self.target is not None and self.target not in TARGETS:
            raise InputError(f"INT8 target {self.target!r}: choose {', '.join(TARGETS)} (onnx: the Q/DQ graph only; "
                             "all: also NNCF's OpenVINO graph when OpenVINO is installed; openvino: that graph or an "
                             "error)", field="target")


class Quantized(NamedTuple):
    """What ``quantize`` committed: the bundle and the graphs' verification rows (none with verify=False)."""

    bundle: Bundle
    rows: list[VerifyRow]


def quantize_bundle(bundle: Bundle, settings: QuantizeSettings | None = None,
                    reporter: Reporter | None = None) -> Quantized:
    """Write the bundle's FP16 and/or INT8 graphs, lint them for TensorRT and verify them on
    ONNX Runtime CPU, then commit them together. A graph that misses its tolerance (exit 1),
    bad input (exit 2) or an interruption leaves the bundle as it was. Returns the committed
    bundle and the verification rows."""
    s = settings or QuantizeSettings()
    reporter = reporter or Reporter()
    target = int8_target(s.target, bundle, list(s.precisions))
    src = bundle.onnx_path("fp32")
    keep = set(s.fp16_keep_fp32)
    if keep and "fp16" in s.precisions:
        check_node_names(src, keep)  # before any work: a typo is exit 2 with the bundle untouched
    calibration = None
    if "int8" in s.precisions:  # read the calibration set first: a bad --calib fails before any work
        calibration = calibration_inputs(bundle, s.calib, s.max_samples)
    if s.calib is not None and bundle.golden.kind == "synthetic-fields" and not bundle.is_demo:
        from attunet_deploy.io.golden import describe

        reporter.notice("note:", f"--calib calibrates only; the {describe(bundle.golden)} (re-export with --images "
                        f"{s.calib} to judge every graph on images like these)")
    with bundle.transaction() as txn:
        done = []
        if "fp16" in s.precisions:
            name = ONNX_FILES["fp16"]
            with reporter.step("Converting to FP16 (float32 I/O)"):
                info = convert_fp16(src, txn.stage(name), keep)
            txn.add_artifact(name, kind=ArtifactKind.ONNX, precision="fp16", producer={**versions(), **info})
            done.append("fp16")
        if calibration is not None:
            _stage_int8(bundle, txn, src, s, target, calibration, reporter)
            done.append("int8")
            if calibration.profile.recorded:
                txn.set_input_profile(bundle.input_profile.merged(calibration.profile).to_dict())
        _lint(bundle, txn, done, reporter)
        rows: list[VerifyRow] = []
        if s.verify:
            from attunet_deploy.judge.verify import verify as run_verify

            rows = run_verify(txn.view(), ["ort"], done, reporter=reporter)
            if any(r.status == Status.FAIL for r in rows):
                from attunet_deploy.judge.report import verify_table

                reporter.table(verify_table(rows, title="Quantised graphs on ONNX Runtime CPU (not written)"))
                failed = ", ".join(f"{r.precision} ({r.reason})" for r in rows if r.status == Status.FAIL)
                raise VerificationFailed(f"{failed}: nothing was written; try another --method, a more representative "
                                         "--calib set, or --no-verify to keep unverified graphs")
            txn.record_verification(rows)
        return Quantized(txn.commit(), rows)


def _stage_int8(bundle: Bundle, txn: Any, src: Path, s: QuantizeSettings, target: str,
                calibration: Calibration, reporter: Reporter) -> None:
    """The Q/DQ INT8 graph (accuracy-aware with a Dice target), then NNCF's OpenVINO graph beside it."""
    inputs, described, used, _ = calibration
    name = ONNX_FILES["int8"]
    ranges = calibrate(src, inputs, s.method, reporter)
    if s.max_dice_drop is None:
        info = quantize_int8(src, txn.stage(name), inputs, method=s.method, quantize_all=s.quantize_all,
                             full_range_weights=s.full_range_weights, reporter=reporter, ranges=ranges)
    else:
        from attunet_deploy.io.golden import load_golden

        cases = load_golden(bundle)
        segmenter = Segmenter(bundle.spec)
        info = accuracy_aware_int8(src, txn.stage(name), ranges, method=s.method, target=1.0 - s.max_dice_drop,
                                   evaluate=lambda p: evaluate_int8(p, cases, segmenter),
                                   quantize_all=s.quantize_all, full_range_weights=s.full_range_weights,
                                   reporter=reporter, allow_float=s.allow_float)
    info["calibration_images"] = len(inputs)
    txn.add_artifact(name, kind=ArtifactKind.ONNX, precision="int8",
                     producer={**versions(), **info, "calibration": described, "calibration_files": used})
    _stage_openvino_int8(bundle, txn, src, inputs, list(info.get("float_nodes", [])), target,
                         s.max_dice_drop, {"calibration": described, "calibration_files": used}, reporter)


def _lint(bundle: Bundle, txn: Any, done: list[str], reporter: Reporter) -> None:
    """TensorRT lint of each new graph (recorded with it); its old engines and EP caches go."""
    from attunet_deploy.build.trt_lint import lint_onnx

    for precision in done:
        issues = lint_onnx(txn.writes[ONNX_FILES[precision]])
        if issues:
            reporter.notice(f"TensorRT lint ({precision}):", "; ".join(issues[:5]))
        txn.annotate(ONNX_FILES[precision], trt_lint=issues)
        _drop_engines_of(bundle, txn, precision)


def _drop_engines_of(bundle: Bundle, txn: Any, precision: str) -> None:
    """Engines and ONNX Runtime TensorRT-EP caches built from the old graph are stale now."""
    for name, entry in bundle.artifacts.items():
        if entry.kind == ArtifactKind.ENGINE and entry.precision == precision:
            txn.remove(name)
    cache_root = bundle.root / ENGINE_DIR / "ort-trt"
    if cache_root.is_dir() and not cache_root.is_symlink():
        for d in cache_root.iterdir():
            if d.is_dir() and (d.name == precision or d.name.startswith(precision + "-")):
                txn.remove_dir(f"{ENGINE_DIR}/ort-trt/{d.name}")
