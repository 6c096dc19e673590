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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ONNX_FILES, Bundle
from ..console import Reporter
from ..environment import versions
from ..errors import InputError
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

    def rewind(self) -> None:  # pragma: no cover - part of the interface, unused by quantize_static
        pass


def quantize_int8(src: Path, dst: Path, calib_inputs: list[np.ndarray], method: str = "percentile",
                  quantize_all: bool = False, full_range_weights: bool = False,
                  reporter: Reporter | None = None) -> dict[str, Any]:
    """Write a Q/DQ INT8 graph of ``src`` calibrated on ``calib_inputs`` (model space, padded).

    Weights use 7 bits of the int8 range by default: x86 CPUs without VNNI run ONNX Runtime's
    int8 convolutions as u8 x s8 products summed pairwise in int16 (``vpmaddubsw``), which
    saturates with full-range weights and wrecks the output (measured on the demo: mean Dice
    0.02 instead of 0.998). 7-bit weights cannot saturate (255 * 63 * 2 < 32767) and are still
    int8 with zero point 0 for TensorRT. ``full_range_weights`` keeps 8 bits for GPU-only use.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reporter = reporter or Reporter()
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    if not calib_inputs:
        raise InputError("the calibration set is empty")
    exclude = [] if quantize_all else float_nodes(src)
    extra = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT rejects anything else
        "WeightSymmetric": True,
        "QuantizeBias": False,  # int32 bias Q/DQ is not TensorRT-friendly
        "DedicatedQDQPair": False,
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
        "CalibTensorRangeSymmetric": True,
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    if method == "entropy":
        extra["CalibNumBins"] = 2048  # histogram resolution; the default 128 clips segmentation outliers
    with reporter.progress(f"Calibrating INT8 ({method}, {len(calib_inputs)} images)", len(calib_inputs)) as advance:
        reader = _CalibrationReader(calib_inputs, "image", advance)
        with atomic_path(dst) as tmp, _quiet_calibrator():
            quantize_static(str(src), str(tmp), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=not full_range_weights,
                            op_types_to_quantize=["Conv"], nodes_to_exclude=exclude,
                            calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                            extra_options=extra, calibration_providers=["CPUExecutionProvider"],
                            use_external_data_format=False)
    return {"method": method, "calibration_images": len(calib_inputs), "float_nodes": exclude,
            "quantize_all": quantize_all, "weight_bits": 8 if full_range_weights else 7}


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


# ------------------------------------------------------------------------------------ bundle step
def calibration_inputs(bundle: Bundle, calib: str | None, max_samples: int) -> tuple[list[np.ndarray], str]:
    """Model-space calibration inputs and a description of where they came from."""
    from ..calibration import load_images, model_inputs

    if calib is None:
        if not bundle.manifest["model"]["source"].get("demo"):
            raise InputError("INT8 needs calibration images for a user model: pass --calib DIR_OR_FILE "
                             "(a few dozen representative slices)")
        from ..demo import CALIB_SEED, DEMO_SIZE, make_phantoms
        from ..preprocess import normalize

        hu, _ = make_phantoms(max_samples, seed=CALIB_SEED, size=DEMO_SIZE)
        x = normalize(hu, bundle.preprocessing)
        return [x[i:i + 1] for i in range(len(x))], f"{max_samples} demo phantoms (seed {CALIB_SEED})"
    records = load_images(calib, bundle.in_channels, max_samples=max_samples)
    return model_inputs(records, bundle.preprocessing, bundle.divisor), f"{len(records)} images from {calib}"


def quantize_bundle(bundle: Bundle, calib: str | None = None, method: str = "percentile", max_samples: int = 64,
                    quantize_all: bool = False, precisions: list[str] | None = None,
                    reporter: Reporter | None = None, verify: bool = True,
                    full_range_weights: bool = False, fp16_keep_fp32: list[str] | None = None
                    ) -> list[dict[str, Any]]:
    """Write the bundle's FP16 and/or INT8 graphs, lint them for TensorRT and verify them on
    ONNX Runtime CPU. Returns the verification rows (also recorded in the manifest)."""
    from .trt_lint import lint_onnx

    reporter = reporter or Reporter()
    precisions = precisions or ["fp16", "int8"]
    src = bundle.onnx_path("fp32")
    producer = versions()
    done = []
    if "int8" in precisions:  # read the calibration set first: a bad --calib fails before any work
        inputs, described = calibration_inputs(bundle, calib, max_samples)
    if "fp16" in precisions:
        name = ONNX_FILES["fp16"]
        with reporter.step("Converting to FP16 (float32 I/O)"), bundle.writing(name) as tmp:
            info = convert_fp16(src, tmp, set(fp16_keep_fp32 or ()))
        bundle.add_artifact(name, kind="onnx", precision="fp16", producer={**producer, **info})
        done.append("fp16")
    if "int8" in precisions:
        name = ONNX_FILES["int8"]
        with bundle.writing(name) as tmp:
            info = quantize_int8(src, tmp, inputs, method=method, quantize_all=quantize_all,
                                 full_range_weights=full_range_weights, reporter=reporter)
        bundle.add_artifact(name, kind="onnx", precision="int8",
                            producer={**producer, **info, "calibration": described})
        done.append("int8")
    for precision in done:
        issues = lint_onnx(bundle.onnx_path(precision))
        if issues:
            reporter.notice(f"TensorRT lint ({precision}):", "; ".join(issues[:5]))
        bundle.artifacts[ONNX_FILES[precision]]["trt_lint"] = issues
    bundle.save()
    if not verify:
        return []
    from ..verify import verify as run_verify

    return run_verify(bundle, ["ort"], done, reporter=reporter)
