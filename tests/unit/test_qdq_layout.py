"""Q/DQ placement rewrites applied after ONNX Runtime's quantiser (build/qdq_layout.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from attunet_deploy.build.qdq_layout import input_rank, quantizer_options, requantize_concat_inputs

SCALE = 0.05


def _concat_graph(path: Path, rank: int = 4) -> None:
    """a (float) and DQ(Q(b)) at another scale, concatenated, then the Concat's own Q/DQ."""
    dims = [1, 2] + [3] * (rank - 2)
    inits = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(0.2, np.float32), "s_b"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [
        helper.make_node("QuantizeLinear", ["b", "s_b", "z"], ["bq"], name="qb"),
        helper.make_node("DequantizeLinear", ["bq", "s_b", "z"], ["bd"], name="dqb"),
        helper.make_node("Concat", ["a", "bd"], ["cat"], axis=1, name="cat"),
        helper.make_node("QuantizeLinear", ["cat", "s", "z"], ["catq"], name="qcat"),
        helper.make_node("DequantizeLinear", ["catq", "s", "z"], ["y"], name="dqcat"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, *dims[2:]])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _quant(x: np.ndarray, scale: float) -> np.ndarray:
    return (np.clip(np.round(x / scale), -128, 127) * scale).astype(np.float32)


def test_concat_inputs_get_the_concat_scale(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _concat_graph(path)
    assert requantize_concat_inputs(path) == 2  # the float input and the input at another scale
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    for name in cat.input:
        dq = producers[name]
        assert dq.op_type == "DequantizeLinear" and dq.input[1] == "s"
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 1, 2, 3, 3)).astype(np.float32)
    opts = ort.SessionOptions()  # the graph as written: ORT would merge the back-to-back Q/DQ pairs of b
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(y, np.concatenate([_quant(a, SCALE), _quant(_quant(b, 0.2), SCALE)], axis=1),
                               atol=1e-6)
    assert requantize_concat_inputs(path) == 0  # idempotent


def test_rank_decides_conv_output_quantisation(tmp_path: Path) -> None:
    for rank in (4, 5):
        _concat_graph(tmp_path / f"r{rank}.onnx", rank)
        assert input_rank(tmp_path / f"r{rank}.onnx") == rank
    assert quantizer_options(4) == {}
    assert quantizer_options(5) == {"OpTypesToExcludeOutputQuantization": ["Conv"]}
