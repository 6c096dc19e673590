"""FP16 graphs: float16 compute with float32 inputs and outputs, made from the FP32 ONNX.

Precision lives in the graph so every backend runs the same thing: ONNX Runtime on any
device, and TensorRT >= 10 strongly typed (TensorRT 11 has no FP16 builder flag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.build.onnx import save_model
from attunet_deploy.errors import InputError

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
    save_model(model, dst)
    return {"initializers_fp16": converted, "kept_fp32_nodes": sorted(keep)}


# ------------------------------------------------------------------------------------ INT8
def check_node_names(onnx_path: Path, names: set[str]) -> None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    unknown = names - {n.name for n in model.graph.node}
    if unknown:
        raise InputError(f"--fp16-keep-fp32: no node named {', '.join(sorted(unknown))} in {onnx_path.name} "
                         "(node names are listed by Netron or onnx.load(...).graph.node)")
