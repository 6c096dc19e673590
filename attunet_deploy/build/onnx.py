"""ONNX graphs: export a torch module with dynamic N/H/W, name its axes, add metadata, save
atomically, list the nodes that stay in float, and compute reference logits.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attunet_deploy.errors import InputError
from attunet_deploy.fileio import atomic_path
from attunet_deploy.segmenter import Segmenter

if TYPE_CHECKING:
    from onnx import NodeProto

DEFAULT_OPSET = 18


#: opsets the exporter and TensorRT's parser both handle well for this model.
SUPPORTED_OPSETS = range(13, 22)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters log many lines (missing torchvision ops, deprecations) that mean nothing here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


def export_onnx(module: Any, in_channels: int, path: Path, opset: int = DEFAULT_OPSET,
                exporter: str = "auto", divisors: tuple[int, ...] = (16, 16)) -> dict[str, Any]:
    """Write a self-contained ONNX graph: input ``image`` [N,C,H,W] (or [N,C,D,H,W] with three
    ``divisors``), output ``logits``, N and every spatial axis dynamic (multiples of its divisor).

    ``exporter``: "dynamo" (torch.export), "torchscript" (the legacy tracer) or "auto" (dynamo,
    falling back to torchscript; TorchScript modules always use the legacy path).
    """
    import onnx
    import torch

    if opset not in SUPPORTED_OPSETS:
        raise InputError(f"--opset {opset} unsupported: choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    axes = "DHW"[-len(divisors):]
    # Two multiples of each divisor (a 3D sample stays small: exporting traces one forward pass).
    sample = torch.zeros(2, in_channels, *(d * (2 if len(divisors) == 3 else max(1, 64 // d)) for d in divisors))
    dynamic = {0: "N", **{2 + i: a for i, a in enumerate(axes)}}
    scripted = isinstance(module, torch.jit.ScriptModule)
    # 3D graphs: the tracer first under "auto" (the dynamo exporter took 41 s against about 2 s for the
    # tracer on a small 3D network here); both are checked against PyTorch right after export.
    auto = ["torchscript", "dynamo"] if len(divisors) == 3 else ["dynamo", "torchscript"]
    order = ["torchscript"] if scripted else (auto if exporter == "auto" else [exporter])
    errors: list[str] = []
    used = None
    with atomic_path(path) as tmp, _quiet_exporter():
        for kind in order:
            try:
                if kind == "dynamo":
                    from torch.export import Dim

                    shapes: dict[int, Any] = {0: Dim("N", min=1, max=4096)}
                    for i, (a, d) in enumerate(zip(axes, divisors)):
                        k = Dim(f"{a.lower()}k", min=1, max=16384 // d)
                        shapes[2 + i] = d * k if d > 1 else k
                    program = torch.onnx.export(module, (sample,), input_names=["image"], output_names=["logits"],
                                                dynamo=True, opset_version=opset, verbose=False,
                                                dynamic_shapes={"x": shapes})
                    if program is None:
                        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
                    program.save(str(tmp), external_data=False)
                else:
                    torch.onnx.export(module, (sample,), str(tmp), input_names=["image"], output_names=["logits"],
                                      dynamo=False, opset_version=opset, do_constant_folding=True,
                                      dynamic_axes={"image": dynamic, "logits": dynamic})
                used = kind
                break
            except Exception as exc:
                errors.append(f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")
        if used is None:
            raise InputError("ONNX export failed: " + " | ".join(errors))
        model = onnx.load(str(tmp))
        _name_dynamic_axes(model)
        model.producer_name = "attunet-deploy"
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(tmp))  # one file: far below the 2 GB external-data limit
    return {"exporter": used, "opset": opset, "fallback_reasons": errors}


def _name_dynamic_axes(model: Any) -> None:
    """Give graph I/O the dim names N, (D,) H, W (the dynamo exporter writes 'N', '16*hk', '16*wk')."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("N", None, *"DHW"[-(len(dims) - 2):])):
            if name is not None:
                dim.ClearField("dim_value")
                dim.dim_param = name


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Store key/value metadata (config, divisor, preprocessing) in the ONNX file itself."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def reference_logits(module: Any, x: np.ndarray, segmenter: Segmenter) -> np.ndarray:
    """PyTorch FP32 logits with the same pad-and-crop the runners apply (the Segmenter's)."""
    import torch

    def forward(xp: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(xp)).float().numpy()

    return segmenter.infer(forward, x, who="PyTorch")


def save_model(model: Any, dst: Path) -> None:
    import onnx

    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp))


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
        keep += _fused_heads(node, producers)
    return keep


def _fused_heads(head: NodeProto, producers: dict[str, NodeProto]) -> list[str]:
    """Convs whose outputs reach the head only through resizing and concatenation: the deep-supervision
    heads of the paper's 3D network (class logits, upsampled and fused by the head)."""
    out, todo, seen = [], list(head.input[:1]), set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "Conv":
            out.append(node.name)
        elif node.op_type in ("Concat", "Resize", "Upsample", "Transpose"):
            todo += [i for i in node.input[:1 if node.op_type != "Concat" else None] if i]
    return out


def subsampling_convs(onnx_path: Path) -> list[str]:
    """Convs whose stride equals their kernel (>1) and whose output is added to another branch: the
    theta convs of the paper's 3D grid attention gates (theta(x) + phi(g)). NNCF's default INT8 of
    them misses the Dice gate on OpenVINO, so NNCF's graph keeps them in float (quantize)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: list(a.ints) for a in node.attribute}
        kernel, strides = attrs.get("kernel_shape", []), attrs.get("strides", [])
        if kernel and kernel == strides and max(strides) > 1 \
                and any(n.op_type == "Add" for n in consumers.get(node.output[0], [])):
            out.append(node.name)
    return out
