"""Where an INT8 graph's Q/DQ pairs sit: rewrites applied after ONNX Runtime's quantiser.

ONNX Runtime places Q/DQ for its own kernels. Two placements break OpenVINO on the paper's 3D
network (measured on the 3D demo, golden windows, mean Dice vs FP32, OpenVINO 2026.4 CPU):

- a Concat whose output is quantised while some of its inputs are float (the gates' outputs):
  OpenVINO's int8 path gives rel L2 0.17 at the next convolution. Quantising every input of
  the Concat with the Concat's own scale (what TensorRT wants too: one scale across a Concat,
  no reformat) brings it to the ONNX Runtime result;
- a convolution's output quantised before its ReLU (ONNX Runtime's QLinearConv pattern):
  OpenVINO's result drifts (mean Dice 0.946). For 5-D graphs the quantiser is told to leave
  convolution outputs in float (see :func:`quantizer_options`): ONNX Runtime has no fast 3-D
  QLinearConv anyway (4x slower than FP32 per window with it, on par without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def input_rank(onnx_path: Path) -> int:
    """Rank of the graph's first input (4 for NCHW, 5 for NCDHW)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return len(graph.input[0].type.tensor_type.shape.dim)


def quantizer_options(rank: int) -> dict[str, list[str]]:
    """Extra quantize_static options that depend on the graph's rank (see the module docstring)."""
    return {"OpTypesToExcludeOutputQuantization": ["Conv"]} if rank == 5 else {}


def requantize_concat_inputs(onnx_path: Path) -> int:
    """Give every input of a quantised Concat the Concat's own Q/DQ (in place); returns how many
    Q/DQ pairs were added. An input that already comes through a DequantizeLinear with the
    same scale is left alone."""
    import onnx

    model = onnx.load(str(onnx_path))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inserts: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        quant = next((c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"), None)
        if quant is None:
            continue
        scale_zp = list(quant.input[1:3])
        for j, name in enumerate(node.input):
            src = producers.get(name)
            if src is not None and src.op_type == "DequantizeLinear" and list(src.input[1:3]) == scale_zp:
                continue
            stem = f"{node.name}_in{j}"
            q_out, dq_out = f"{stem}_q", f"{stem}_dq"
            inserts.setdefault(node.name, []).extend([
                onnx.helper.make_node("QuantizeLinear", [name, *scale_zp], [q_out], name=f"{stem}_Quantize"),
                onnx.helper.make_node("DequantizeLinear", [q_out, *scale_zp], [dq_out], name=f"{stem}_Dequantize"),
            ])
            node.input[j] = dq_out
    if not inserts:
        return 0
    ordered = []
    for node in graph.node:  # each new pair goes right before its Concat: the graph stays sorted
        ordered += inserts.get(node.name, [])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(onnx_path))
    return sum(len(v) for v in inserts.values()) // 2
