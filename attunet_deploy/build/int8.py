"""INT8 Q/DQ graphs made from the FP32 ONNX and a calibration set.

INT8 follows what TensorRT's ONNX parser accepts (docs/design.md section 4): symmetric int8
with zero point 0, per-channel weights on Conv axis 0, per-tensor activations, no bias
quantisation, only Conv quantised. By default the attention gates' psi convs (whose sigmoid
decides what is kept) and the final logits conv stay in float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.build.onnx import float_nodes
from attunet_deploy.build.qdq_layout import input_rank, quantizer_options, requantize_concat_inputs
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import atomic_path

#: Calibration methods (CLI name -> onnxruntime CalibrationMethod member).
METHODS = {"entropy": "Entropy", "percentile": "Percentile", "minmax": "MinMax"}


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
_CALIB_OPTIONS: dict[str, dict[str, object]] = {
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
        full_range = first_block_inputs(src)
        for name, (hist, edges, *_rest) in calibrator.collector.histogram_dict.items():
            t = np.float32(edges[-1] if name in full_range else kl_threshold(hist, edges))
            ranges[name] = TensorData(lowest=np.float32(-t), highest=t)
        return TensorsData(CalibrationMethod.Entropy, ranges)


#: Convolutions at the start of the network whose inputs keep their full (min/max) range under
#: entropy calibration: the first block (two convolutions in every family here).
FIRST_BLOCK_CONVS = 2


def first_block_inputs(onnx_path: Path) -> set[str]:
    """Inputs of the network's first convolutions (the image and the first block's activation).

    Entropy (KL) calibration clips them far too hard on CT: the window leaves most voxels at the
    same value (air, fat), a spike the KL search trades the tail for. Measured on the 2D demo:
    mean Dice vs FP32 0.0000 with KL ranges everywhere, 0.0000 with only the image at min/max,
    0.995 with the first block's two inputs at min/max."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"][:FIRST_BLOCK_CONVS]
    return {n.input[0] for n in convs}


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
        **quantizer_options(input_rank(src)),
    }
    with tempfile.TemporaryDirectory(prefix="attdeploy-quant-") as tmp, atomic_path(dst) as out, _quiet_calibrator():
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(str(_private_copy(src, tmp)), str(out), None, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=not full_range_weights, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=exclude, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                        calibration_cache_path=str(cache), extra_options=extra, use_external_data_format=False)
        concat_pairs = requantize_concat_inputs(out)
    return {"method": method, "calibration_images": len(calib_inputs or []), "float_nodes": exclude,
            "concat_input_qdq": concat_pairs,
            "conv_outputs_quantized": "OpTypesToExcludeOutputQuantization" not in extra,
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
