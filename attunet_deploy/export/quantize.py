"""Explicit-precision graphs: FP16 (float32 I/O) and INT8 Q/DQ, made from the FP32 ONNX.

Precision lives in the graph so every backend runs the same thing: ONNX Runtime on any
device, and TensorRT >= 10 strongly typed (TensorRT 11 has no FP16/INT8 builder flags).

INT8 follows what TensorRT's ONNX parser accepts (design.md section 4, reference.md):
symmetric int8 with zero point 0, per-channel weights on Conv axis 0, per-tensor
activations, no bias quantisation, only Conv quantised. By default the attention gates'
psi convs (whose sigmoid decides what is kept) and the final logits conv stay in float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ENGINE_DIR, ONNX_FILES, Bundle
from ..console import Reporter
from ..environment import versions
from ..errors import InputError, VerificationFailed
from ..fileio import atomic_path

#: Calibration methods (CLI name -> onnxruntime CalibrationMethod member).
METHODS = {"entropy": "Entropy", "percentile": "Percentile", "minmax": "MinMax"}
#: ONNX ops whose float inputs at these indices must stay float32 (shape/scale arguments).
_KEEP_FLOAT_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


# ------------------------------------------------------------------------------------ FP16
def convert_fp16(src: Path, dst: Path, keep_fp32_nodes: set[str] | None = None) -> dict[str, Any]:
    """Write an FP16-compute copy of ``src`` with float32 input and output.

    Float initializers become float16 except shape/scale arguments (Resize scales must be
    float32); a Cast after the input and one before the output keep the I/O float32.
    ``keep_fp32_nodes`` run in float32 between casts (for activations that overflow FP16).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    keep = set(keep_fp32_nodes or ())
    unknown = keep - {n.name for n in graph.node}
    if unknown:
        raise InputError(f"--fp16-keep-fp32: no node named {', '.join(sorted(unknown))} in {src.name} "
                         "(node names are listed by Netron or onnx.load(...).graph.node)")
    keep_float: set[str] = set()
    for node in graph.node:
        for i in _KEEP_FLOAT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                keep_float.add(node.input[i])
        if node.name in keep:
            keep_float.update(node.input)
    converted = 0
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep_float:
            arr = numpy_helper.to_array(init)
            if np.abs(arr).max(initial=0) > 65504:
                raise InputError(f"weight {init.name} exceeds the FP16 range; keep it in FP32")
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
            converted += 1
    for node in graph.node:  # Constant nodes (legacy exporter) holding float tensors
        if node.op_type == "Constant" and node.output[0] not in keep_float:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    arr = numpy_helper.to_array(attr.t).astype(np.float16)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        for attr in node.attribute:  # Cast-to-float inside the graph must become float16
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16

    new_nodes = []
    inp, out = graph.input[0].name, graph.output[0].name
    inp16, out16 = f"{inp}_fp16", f"{out}_fp16"
    new_nodes.append(helper.make_node("Cast", [inp], [inp16], to=TensorProto.FLOAT16, name="cast_input_fp16"))
    for node in graph.node:
        node.input[:] = [inp16 if n == inp else n for n in node.input]
        node.output[:] = [out16 if n == out else n for n in node.output]
        if node.name in keep:
            # Run this node in FP32: cast its activation inputs up and its outputs back down.
            for i, name in enumerate(node.input):
                if name and name not in keep_float:
                    up = f"{name}_to32_{node.name}"
                    new_nodes.append(helper.make_node("Cast", [name], [up], to=TensorProto.FLOAT, name=up))
                    node.input[i] = up
            outs = list(node.output)
            node.output[:] = [f"{o}_fp32" for o in outs]
            new_nodes.append(node)
            for o in outs:
                new_nodes.append(helper.make_node("Cast", [f"{o}_fp32"], [o], to=TensorProto.FLOAT16,
                                                  name=f"{o}_to16"))
            continue
        new_nodes.append(node)
    new_nodes.append(helper.make_node("Cast", [out16], [out], to=TensorProto.FLOAT, name="cast_output_fp32"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale float32 annotations; shapes are re-inferred by consumers
    onnx.checker.check_model(model)
    _save(model, dst)
    return {"initializers_fp16": converted, "kept_fp32_nodes": sorted(keep)}


# ------------------------------------------------------------------------------------ INT8
def float_nodes(onnx_path: Path) -> list[str]:
    """Conv nodes kept in float by default: each attention gate's psi conv and the logits head.

    Found structurally (no names needed): a psi conv has 1 output channel and feeds a Sigmoid
    (through its folded BatchNorm); the head is the Conv that produces the graph output.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {o: n for n in graph.node for o in n.output}
    keep = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        nexts = consumers.get(node.output[0], [])
        # walk through a BatchNormalization (exported unfused by the legacy exporter in train-less graphs)
        while len(nexts) == 1 and nexts[0].op_type == "BatchNormalization":
            nexts = consumers.get(nexts[0].output[0], [])
        if any(n.op_type == "Sigmoid" for n in nexts):
            keep.append(node.name)
    out = graph.output[0].name
    node = producers.get(out)
    while node is not None and node.op_type != "Conv" and node.input:
        node = producers.get(node.input[0])
    if node is not None:
        keep.append(node.name)
    return keep


class _CalibrationReader:
    """onnxruntime CalibrationDataReader over padded model-space images (one per batch)."""

    def __init__(self, inputs: list[np.ndarray], input_name: str, advance: Any) -> None:
        self._it: Iterator[np.ndarray] = iter(inputs)
        self._name = input_name
        self._advance = advance

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is None:
            return None
        self._advance()
        return {self._name: x}

    def rewind(self) -> None:  # pragma: no cover - part of the interface, unused by the calibrators
        pass


#: Histogram settings per method (onnxruntime calibrators). Entropy collects the same histogram of
#: |x| as percentile (2048 bins, as TensorRT does) and picks its threshold with
#: :func:`kl_threshold`: onnxruntime's own entropy search with its defaults (128 bins, 128 levels)
#: has one candidate, the full range, and silently equals minmax.
_CALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": True},
    "percentile": {"symmetric": True, "num_bins": 2048, "percentile": 99.999},
    "entropy": {"symmetric": True, "num_bins": 2048, "percentile": 100.0},
}
QUANTIZED_OPS = ["Conv"]
CALIB_CHUNK = 2
#: Quantised levels of one sign of symmetric int8 (the KL search models this quantiser).
INT8_LEVELS = 128


def _smooth(dist: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins a little mass (taken from the others) so that KL divergence stays finite."""
    zeros = dist == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return None
    out = dist.astype(np.float64) + eps * zeros
    out[~zeros] -= eps * n_zero / n_nonzero
    return out if np.all(out > 0) else None


def kl_threshold(hist: np.ndarray, edges: np.ndarray, levels: int = INT8_LEVELS) -> float:
    """TensorRT's entropy calibration on a histogram of |x|: the clipping threshold whose
    ``levels``-level quantisation keeps the distribution closest in KL divergence."""
    hist = np.asarray(hist, dtype=np.float64).copy()
    n = hist.size
    if n > 1:
        hist[0] = hist[1]  # ReLU's exact zeros pile up in bin 0 and would drag the threshold down
    if n <= levels or hist.sum() == 0:
        return float(edges[-1])
    best, best_i = np.inf, n
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[-1] += tail[i]  # values above the threshold are clipped into its last bin
        bounds = (np.arange(levels + 1) * i) // levels
        merged = np.add.reduceat(hist[:i], bounds[:-1])
        nonzero = p != 0
        counts = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        per_bin = np.divide(merged, counts, out=np.zeros_like(merged), where=counts > 0)
        q = np.repeat(per_bin, np.diff(bounds)) * nonzero
        if q.sum() <= 0:
            continue
        ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
        if ps is None or qs is None:
            continue
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _private_copy(src: Path, tmp: str) -> Path:
    """``src`` copied into ``tmp``: ONNX Runtime's quantisation helpers write files beside the model they
    are given (``<model>-inferred.onnx`` from shape inference), which must never land in a bundle."""
    dst = Path(tmp) / f"source-{Path(src).name}"
    shutil.copyfile(src, dst)
    return dst


def calibrate(src: Path, calib_inputs: list[np.ndarray], method: str = "percentile",
              reporter: Reporter | None = None) -> Any:
    """Activation ranges (onnxruntime TensorsData) of the tensors INT8 quantises, by ``method``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, create_calibrator

    reporter = reporter or Reporter()
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    if not calib_inputs:
        raise InputError("the calibration set is empty")
    collect_as = "percentile" if method == "entropy" else method
    with reporter.progress(f"Calibrating INT8 ({method}, {len(calib_inputs)} images)", len(calib_inputs)) as advance, \
            tempfile.TemporaryDirectory(prefix="attdeploy-calib-") as tmp, _quiet_calibrator():
        calibrator = create_calibrator(_private_copy(src, tmp), QUANTIZED_OPS,
                                       augmented_model_path=f"{tmp}/augmented.onnx",
                                       calibrate_method=getattr(CalibrationMethod, METHODS[collect_as]),
                                       providers=["CPUExecutionProvider"], extra_options=_CALIB_OPTIONS[method])
        # A few images per pass: the calibrators keep every intermediate tensor of a pass in memory
        # (about 300 MB per 256x256 image for the full-size model); ranges and histograms accumulate.
        for start in range(0, len(calib_inputs), CALIB_CHUNK):
            calibrator.collect_data(_CalibrationReader(calib_inputs[start:start + CALIB_CHUNK], "image", advance))
        if method != "entropy":
            return calibrator.compute_data()
        ranges = {}
        for name, (hist, edges, *_rest) in calibrator.collector.histogram_dict.items():
            t = np.float32(kl_threshold(hist, edges))
            ranges[name] = TensorData(lowest=np.float32(-t), highest=t)
        return TensorsData(CalibrationMethod.Entropy, ranges)


def quantize_int8(src: Path, dst: Path, calib_inputs: list[np.ndarray] | None = None, method: str = "percentile",
                  quantize_all: bool = False, full_range_weights: bool = False,
                  reporter: Reporter | None = None, *, ranges: Any = None,
                  extra_float: list[str] | None = None) -> dict[str, Any]:
    """Write a Q/DQ INT8 graph of ``src`` calibrated on ``calib_inputs`` (model space, padded), or
    with precomputed ``ranges`` (:func:`calibrate`); ``extra_float`` convolutions stay in float too.

    Weights use 7 bits of the int8 range by default: x86 CPUs without VNNI run ONNX Runtime's
    int8 convolutions as u8 x s8 products summed pairwise in int16 (``vpmaddubsw``), which
    saturates with full-range weights and wrecks the output (measured on the demo: mean Dice
    0.02 instead of 0.998). 7-bit weights cannot saturate (255 * 63 * 2 < 32767) and are still
    int8 with zero point 0 for TensorRT. ``full_range_weights`` keeps 8 bits for GPU-only use.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    if ranges is None:
        ranges = calibrate(src, calib_inputs or [], method, reporter)
    exclude = ([] if quantize_all else float_nodes(src)) + [n for n in (extra_float or []) if n]
    extra = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT rejects anything else
        "WeightSymmetric": True,
        "QuantizeBias": False,  # int32 bias Q/DQ is not TensorRT-friendly
        "DedicatedQDQPair": False,
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
    }
    with tempfile.TemporaryDirectory(prefix="attdeploy-quant-") as tmp, atomic_path(dst) as out, _quiet_calibrator():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(str(_private_copy(src, tmp)), str(out), None, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=not full_range_weights, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=exclude, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                        calibration_cache_path=str(cache), extra_options=extra, use_external_data_format=False)
    return {"method": method, "calibration_images": len(calib_inputs or []), "float_nodes": exclude,
            "quantize_all": quantize_all, "weight_bits": 8 if full_range_weights else 7}


def quantized_convs(int8_path: Path) -> list[str]:
    """Names of the convolutions an INT8 graph runs in int8 (their weights come through a DequantizeLinear)."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    return [n.name for n in graph.node if n.op_type == "Conv" and len(n.input) > 1
            and getattr(producers.get(n.input[1]), "op_type", "") == "DequantizeLinear"]


#: Single-input ops an activation passes through between two convolutions unchanged in range.
_PASS_THROUGH = ("Relu", "MaxPool", "QuantizeLinear", "DequantizeLinear", "Identity", "Resize", "Upsample")


def revert_units(int8_path: Path) -> list[tuple[str, ...]]:
    """What accuracy-aware INT8 returns to float together: each quantised convolution with the
    convolution that produces its input (through ReLU/max-pool), because onnxruntime quantises a
    convolution's output as well as its inputs: an activation with outliers stays quantised until
    both ends of it are float."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantized = set(quantized_convs(int8_path))
    units: list[tuple[str, ...]] = []
    for node in graph.node:
        if node.name not in quantized:
            continue
        src = producers.get(node.input[0])
        while src is not None and src.op_type in _PASS_THROUGH and src.input:
            src = producers.get(src.input[0])
        upstream = src.name if src is not None and src.op_type == "Conv" and src.name in quantized else None
        unit = tuple(sorted({node.name, upstream} - {None}))  # type: ignore[arg-type]
        if unit not in units:
            units.append(unit)
    return units


@contextlib.contextmanager
def _quiet_calibrator() -> Iterator[None]:
    """ONNX Runtime's calibrators print to stdout and warn on the root logger; keep stdout for
    our tables and JSON."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _save(model: Any, dst: Path) -> None:
    import onnx

    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp))


# ------------------------------------------------------------------------------------ accuracy-aware INT8
def evaluate_int8(path: Path, cases: list[Any], postprocessing: dict[str, Any], threads: int = 0
                  ) -> tuple[float, float]:
    """(mean Dice vs the golden reference, p50 latency in ms on the first case) of an INT8 graph on
    ONNX Runtime CPU."""
    import onnxruntime as ort

    from ..preprocess import crop, pad_to_divisor
    from ..verify import DEFAULT_TOLERANCES, compare

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    outs = []
    for c in cases:
        xp, size = pad_to_divisor(c.inputs, 16)
        outs.append(crop(sess.run(None, {"image": xp})[0], size))
    row = compare(outs, cases, postprocessing, DEFAULT_TOLERANCES["int8"])
    xp, _ = pad_to_divisor(cases[0].inputs, 16)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sess.run(None, {"image": xp})
        times.append(time.perf_counter() - t0)
    return float(row["mean_dice"]), 1000.0 * float(np.median(times))


def accuracy_aware_int8(src: Path, dst: Path, ranges: Any, *, method: str, target: float, cases: list[Any],
                        postprocessing: dict[str, Any], quantize_all: bool = False, full_range_weights: bool = False,
                        reporter: Reporter | None = None) -> dict[str, Any]:
    """Quantise, and while the held-out images' mean Dice vs FP32 misses ``target``, return the most
    sensitive convolutions to float one at a time (after NNCF's quantize_with_accuracy_control).

    Sensitivity of a convolution = the mean Dice gained by keeping only it in float. Writes the
    final graph to ``dst``; returns the record for the manifest (every step's float layers, Dice
    and latency). Raises VerificationFailed when even all convolutions in float miss the target.
    """
    reporter = reporter or Reporter()
    kw = {"method": method, "quantize_all": quantize_all, "full_range_weights": full_range_weights,
          "ranges": ranges}
    info = quantize_int8(src, dst, **kw)
    dice, ms = evaluate_int8(dst, cases, postprocessing)
    steps = [{"float_added": [], "mean_dice": dice, "latency_ms": ms}]
    record = {"target_mean_dice": target, "steps": steps, "reverted": []}
    if dice >= target:
        reporter.info(f"INT8 mean Dice {dice:.4f} >= {target:.4f}: no convolution returned to float")
        return {**info, "accuracy_aware": record}
    units = revert_units(dst)
    gains = []
    with tempfile.TemporaryDirectory(prefix="attdeploy-aa-") as tmp, \
            reporter.progress(f"Ranking {len(units)} convolutions by sensitivity (Dice {dice:.4f} < {target:.4f})",
                              len(units)) as advance:
        for unit in units:
            trial = Path(tmp) / "trial.onnx"
            quantize_int8(src, trial, extra_float=list(unit), **kw)
            gains.append((evaluate_int8(trial, cases, postprocessing)[0] - dice, unit))
            advance()
    ranking = [u for _, u in sorted(gains, key=lambda g: (-g[0], g[1]))]
    record["sensitivity"] = [{"convs": list(u), "dice_gain": g} for g, u in sorted(gains, key=lambda g: -g[0])]
    reverted: list[str] = []
    for unit in ranking:
        added = [c for c in unit if c not in reverted]
        if not added:
            continue
        reverted += added
        info = quantize_int8(src, dst, extra_float=reverted, **kw)
        dice, ms = evaluate_int8(dst, cases, postprocessing)
        steps.append({"float_added": added, "mean_dice": dice, "latency_ms": ms})
        reporter.info(f"  + {', '.join(added)} in float: mean Dice {dice:.4f}, {ms:.1f} ms")
        if dice >= target:
            record["reverted"] = list(reverted)
            return {**info, "accuracy_aware": record}
    raise VerificationFailed(f"INT8 cannot reach mean Dice {target:.4f} on the held-out images even with all "
                             f"{len(reverted)} convolutions in float (best {max(s['mean_dice'] for s in steps):.4f}); "
                             "nothing was written: calibrate on more representative images or keep FP16")


# ------------------------------------------------------------------------------------ bundle step
def golden_shas(bundle: Bundle) -> dict[str, set[int] | None]:
    """sha256 of each held-out golden file -> its held-out image indices (None: the whole file)."""
    out: dict[str, set[int] | None] = {}
    for s in bundle.golden_info.get("source", []):
        if isinstance(s, dict) and isinstance(s.get("sha256"), str):
            idx = s.get("indices")
            out[s["sha256"]] = {int(i) for i in idx} if isinstance(idx, list) else None
    return out


def calibration_inputs(bundle: Bundle, calib: str | None, max_samples: int
                       ) -> tuple[list[np.ndarray], str, list[str]]:
    """Model-space calibration inputs, a description, and the calibration files (relative names).

    Files whose content is one of the held-out golden images are never used for calibration,
    whatever folder they come from: calibration and verification stay disjoint.
    """
    from ..calibration import (
        check_held,
        file_sha256,
        list_image_files,
        model_inputs,
        read_file,
        relative_name,
        sample_files,
        subsample,
    )

    if calib is None:
        root = bundle.golden_info.get("root") if bundle.golden_info.get("kind") == "user-images" else None
        if root and Path(root).exists():
            calib = root  # the images export held out a quarter of; the rest calibrate
        elif not bundle.manifest["model"]["source"].get("demo"):
            raise InputError("INT8 needs calibration images for a user model: pass --calib DIR_OR_FILE "
                             "(a few dozen representative slices)")
        else:
            from ..demo import CALIB_SEED, DEMO_SIZE, make_phantoms
            from ..preprocess import normalize

            hu, _ = make_phantoms(max_samples, seed=CALIB_SEED, size=DEMO_SIZE)
            x = normalize(hu, bundle.preprocessing)
            return ([x[i:i + 1] for i in range(len(x))], f"{max_samples} demo phantoms (seed {CALIB_SEED})",
                    [f"demo phantom seed {CALIB_SEED}"])
    root = Path(calib)
    files = list_image_files(root)
    held = golden_shas(bundle)
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
            recs = [r for r in recs if r.index not in held[sha]]
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
    return model_inputs(records, bundle.preprocessing, bundle.divisor), described, used_files


def check_quantize_options(method: str, max_samples: int, precisions: list[str]) -> None:
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or not 1 <= max_samples <= 100_000:
        raise InputError(f"--max-samples {max_samples!r}: must be an integer in 1..100000")
    bad = [p for p in precisions if p not in ("fp16", "int8")]
    if bad:
        raise InputError(f"--precision {bad[0]!r}: quantize makes fp16 and int8")


def quantize_bundle(bundle: Bundle, calib: str | None = None, method: str = "percentile", max_samples: int = 64,
                    quantize_all: bool = False, precisions: list[str] | None = None,
                    reporter: Reporter | None = None, verify: bool = True,
                    full_range_weights: bool = False, fp16_keep_fp32: list[str] | None = None,
                    max_dice_drop: float | None = None) -> list[dict[str, Any]]:
    """Write the bundle's FP16 and/or INT8 graphs, lint them for TensorRT and verify them on
    ONNX Runtime CPU, then commit them together. A graph that misses its tolerance (exit 1),
    bad input (exit 2) or an interruption leaves the bundle as it was. Returns the rows."""
    from .trt_lint import lint_onnx

    reporter = reporter or Reporter()
    precisions = precisions or ["fp16", "int8"]
    check_quantize_options(method, max_samples, precisions)
    if max_dice_drop is not None:
        from ..verify import check_dice_drop

        check_dice_drop(max_dice_drop)
        if "int8" not in precisions:
            raise InputError("--max-dice-drop drives accuracy-aware INT8 (convolutions return to float until the "
                             "Dice target holds); it does nothing for FP16: add --precision int8 or drop it")
    src = bundle.onnx_path("fp32")
    keep = set(fp16_keep_fp32 or ())
    if keep and "fp16" in precisions:
        check_node_names(src, keep)  # before any work: a typo is exit 2 with the bundle untouched
    if "int8" in precisions:  # read the calibration set first: a bad --calib fails before any work
        inputs, described, used = calibration_inputs(bundle, calib, max_samples)
    producer = versions()
    done = []
    with bundle.transaction() as txn:
        if "fp16" in precisions:
            name = ONNX_FILES["fp16"]
            with reporter.step("Converting to FP16 (float32 I/O)"):
                info = convert_fp16(src, txn.stage(name), keep)
            txn.add_artifact(name, kind="onnx", precision="fp16", producer={**producer, **info})
            done.append("fp16")
        if "int8" in precisions:
            name = ONNX_FILES["int8"]
            ranges = calibrate(src, inputs, method, reporter)
            if max_dice_drop is None:
                info = quantize_int8(src, txn.stage(name), inputs, method=method, quantize_all=quantize_all,
                                     full_range_weights=full_range_weights, reporter=reporter, ranges=ranges)
            else:
                from ..golden import load_golden

                info = accuracy_aware_int8(src, txn.stage(name), ranges, method=method, target=1.0 - max_dice_drop,
                                           cases=load_golden(bundle), postprocessing=bundle.postprocessing,
                                           quantize_all=quantize_all, full_range_weights=full_range_weights,
                                           reporter=reporter)
            info["calibration_images"] = len(inputs)
            txn.add_artifact(name, kind="onnx", precision="int8",
                             producer={**producer, **info, "calibration": described, "calibration_files": used})
            done.append("int8")
        for precision in done:
            issues = lint_onnx(txn.writes[ONNX_FILES[precision]])
            if issues:
                reporter.notice(f"TensorRT lint ({precision}):", "; ".join(issues[:5]))
            txn.manifest["artifacts"][ONNX_FILES[precision]]["trt_lint"] = issues
            _drop_engines_of(bundle, txn, precision)
        rows: list[dict[str, Any]] = []
        if verify:
            from ..verify import verify as run_verify

            rows = run_verify(txn.view(), ["ort"], done, reporter=reporter)
            if any(r["status"] == "fail" for r in rows):
                from ..report import verify_table

                reporter.table(verify_table(rows, title="Quantised graphs on ONNX Runtime CPU (not written)"))
                failed = ", ".join(f"{r['precision']} ({r['reason']})" for r in rows if r["status"] == "fail")
                raise VerificationFailed(f"{failed}: nothing was written; try another --method, a more representative "
                                         "--calib set, or --no-verify to keep unverified graphs")
            txn.record_verification(rows)
        txn.commit()
    return rows


def _drop_engines_of(bundle: Bundle, txn: Any, precision: str) -> None:
    """Engines and ONNX Runtime TensorRT-EP caches built from the old graph are stale now."""
    for name, entry in bundle.artifacts.items():
        if entry.get("kind") == "tensorrt-engine" and entry.get("precision") == precision:
            txn.remove(name)
    cache_root = bundle.root / ENGINE_DIR / "ort-trt"
    if cache_root.is_dir() and not cache_root.is_symlink():
        for d in cache_root.iterdir():
            if d.is_dir() and (d.name == precision or d.name.startswith(precision + "-")):
                txn.remove_dir(f"{ENGINE_DIR}/ort-trt/{d.name}")


def check_node_names(onnx_path: Path, names: set[str]) -> None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    unknown = names - {n.name for n in model.graph.node}
    if unknown:
        raise InputError(f"--fp16-keep-fp32: no node named {', '.join(sorted(unknown))} in {onnx_path.name} "
                         "(node names are listed by Netron or onnx.load(...).graph.node)")
