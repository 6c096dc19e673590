"""Offline TensorRT compatibility lint for the bundle's ONNX graphs (runs on any machine).

Catches, before anyone reaches the target device, what would make TensorRT's ONNX parser or
builder refuse a graph or silently change its meaning: ops outside the set this model needs,
Q/DQ that is not int8 with zero point 0 or per-channel on an axis other than the weight's
output axis, per-channel activations, opset < 13 with Q/DQ, non-float I/O, fixed dims where
N/H/W must be dynamic. For 3D graphs (onnx-tensorrt 10.x's importers): Conv/ConvTranspose and
MaxPool kernels of 2 or 3 spatial dims only, MaxPool without dilation, linear (trilinear) Resize
only over the 3 innermost axes (N and C scales 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Ops TensorRT's ONNX parser supports that an Attention U-Net graph may contain.
TRT_SUPPORTED_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "MaxPool", "Resize", "Upsample", "Add", "Mul", "Sigmoid", "Concat",
    "Cast", "QuantizeLinear", "DequantizeLinear", "Constant", "BatchNormalization", "Identity",
    "Shape", "Gather", "Slice", "Unsqueeze", "Reshape", "Div", "Floor", "Sub",
    # the 3D families: the NCDHW <-> authors' axis order, expand_as of the gate, MONAI's shape plumbing
    "Transpose", "Expand", "Squeeze",
})
#: Weight input index and per-channel (output channel) axis for each quantisable op.
_WEIGHT_AXIS = {"Conv": (1, 0), "ConvTranspose": (1, 1)}


def lint_onnx(path: str | Path) -> list[str]:
    """Problems TensorRT would have with the graph at ``path``; an empty list means none found."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return lint_model(model)


def lint_model(model: Any) -> list[str]:
    from onnx import numpy_helper

    graph = model.graph
    issues: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def const_array(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name])
        return None

    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, idx))

    issues += _io_issues(graph)

    unsupported = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")
                          or n.op_type not in TRT_SUPPORTED_OPS})
    if unsupported:
        issues.append(f"ops TensorRT's parser will not take for this model: {', '.join(unsupported)}")

    has_qdq = False
    for node in graph.node:
        issues += _spatial_issues(node, const_array)
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in ("nearest", "linear"):
                issues.append(f"{node.name}: Resize mode {mode!r} (TensorRT: nearest or linear)")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        has_qdq = True
        scale = const_array(node.input[1]) if len(node.input) > 1 else None
        zp = const_array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None:
            if zp.dtype != np.int8:
                issues.append(f"{node.name}: zero point is {zp.dtype}, TensorRT needs int8")
            elif np.any(zp != 0):
                issues.append(f"{node.name}: zero point must be 0 (symmetric), found {int(np.abs(zp).max())}")
        elif node.op_type == "QuantizeLinear":
            issues.append(f"{node.name}: QuantizeLinear without zero point quantises to uint8; use int8 zp=0")
        if scale is None:
            issues.append(f"{node.name}: scale is not a constant")
            continue
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            issues.append(f"{node.name}: scales must be positive and finite")
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            target = node.output[0] if node.op_type == "DequantizeLinear" else None
            feeds_weight = False
            if target is not None:
                for consumer, idx in consumers.get(target, []):
                    w_idx, w_axis = _WEIGHT_AXIS.get(consumer.op_type, (None, None))
                    if idx == w_idx:
                        feeds_weight = True
                        if axis != w_axis:
                            issues.append(f"{node.name}: per-channel axis {axis}, {consumer.op_type} weights "
                                          f"need axis {w_axis}")
            is_weight_q = node.op_type == "QuantizeLinear" and node.input[0] in inits
            if not feeds_weight and not is_weight_q:
                issues.append(f"{node.name}: per-channel scales on an activation (TensorRT: weights only)")
    if has_qdq and opset < 13:
        issues.append(f"opset {opset}: Q/DQ with per-channel scales needs opset >= 13")
    return issues


def _spatial_issues(node: Any, const_array: Any) -> list[str]:
    """Kernel ranks and resize axes TensorRT's importers accept (2D and 3D networks)."""
    attrs = {a.name: a for a in node.attribute}
    out: list[str] = []
    if node.op_type in ("Conv", "ConvTranspose", "MaxPool") and "kernel_shape" in attrs:
        rank = len(attrs["kernel_shape"].ints)
        if rank not in (2, 3):
            out.append(f"{node.name}: {node.op_type} over {rank} spatial dims (TensorRT: 2D or 3D)")
    if node.op_type == "MaxPool" and "dilations" in attrs and any(d != 1 for d in attrs["dilations"].ints):
        out.append(f"{node.name}: MaxPool with dilations {list(attrs['dilations'].ints)} (TensorRT: none)")
    if node.op_type == "Resize" and "mode" in attrs and attrs["mode"].s.decode() == "linear" and len(node.input) > 2:
        scales = const_array(node.input[2]) if node.input[2] else None
        if scales is not None and scales.size > 3 and np.any(scales[:-3] != 1):
            out.append(f"{node.name}: linear Resize scales {scales.tolist()} resize beyond the 3 innermost axes "
                       "(TensorRT: N and C scales must be 1)")
    return out


def _io_issues(graph: Any) -> list[str]:
    """Inputs and outputs: float32, [N, C, H, W] (or [N, C, D, H, W]) with N and the spatial axes
    dynamic and C fixed."""
    from onnx import TensorProto

    issues: list[str] = []
    for value in list(graph.input) + list(graph.output):
        tt = value.type.tensor_type
        if tt.elem_type != TensorProto.FLOAT:
            issues.append(f"{value.name}: I/O must be float32, is {TensorProto.DataType.Name(tt.elem_type)}")
        dims = tt.shape.dim
        if len(dims) not in (4, 5):
            issues.append(f"{value.name}: expected 4 dims [N,C,H,W] or 5 [N,C,D,H,W], has {len(dims)}")
            continue
        for axis, label in ((0, "N"), *((2 + i, a) for i, a in enumerate("DHW"[-(len(dims) - 2):]))):
            if not dims[axis].dim_param:
                issues.append(f"{value.name}: dim {label} is fixed ({dims[axis].dim_value}); must be dynamic")
        if dims[1].dim_param or dims[1].dim_value < 1:
            issues.append(f"{value.name}: channel dim must be a fixed number")
    return issues
