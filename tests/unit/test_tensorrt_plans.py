"""CPU tests of OUR TensorRT decisions that need no bundle: profiles, build plan per TensorRT major,
cache key, workspace, layer-precision reading, profile choice and chunking, the lint.

Where TensorRT or CUDA would be called, stand-ins imitate their documented behaviour: they test our
logic only and are no evidence that TensorRT works (tests/gpu are).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trtstandins import GPU, FakeCudart, ReusingRunner, inspector_json, layer

from attunet_deploy.build.tensorrt import (
    BuildSettings,
    Profile,
    build_plan,
    check_layer_precision,
    default_workspace_mb,
    engine_cache_key,
    layer_precisions,
    parse_profiles,
)
from attunet_deploy.build.trt_lint import lint_model
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.runtimes.tensorrt import choose_profile


def test_default_profile_covers_golden_shapes() -> None:
    (p,) = parse_profiles((), (), (), channels=1)
    assert p.contains((8, 1, 128, 128)) and p.contains((1, 1, 112, 128)) and p.contains((1, 1, 512, 512))
    assert not p.contains((1, 1, 1024, 1024))


def test_profiles_parse_and_validate() -> None:
    ps = parse_profiles(["1x1x512x512", "1x1x256x256"], ["1x1x512x512", "2x1x256x256"],
                        ["2x1x512x512", "4x1x256x256"], channels=1)
    assert ps == [Profile((1, 1, 512, 512), (1, 1, 512, 512), (2, 1, 512, 512)),
                  Profile((1, 1, 256, 256), (2, 1, 256, 256), (4, 1, 256, 256))]
    assert parse_profiles(["1x1x64x64"], [], ["2x1x128x128"], 1)[0].opt == (2, 1, 128, 128)
    with pytest.raises(InputError, match="multiples of 16"):
        parse_profiles(["1x1x100x100"], [], ["1x1x128x128"], 1)
    with pytest.raises(InputError, match="min <= opt <= max"):
        parse_profiles(["1x1x256x256"], ["1x1x128x128"], ["1x1x512x512"], 1)
    with pytest.raises(InputError, match="as many"):
        parse_profiles(["1x1x64x64", "1x1x64x64"], [], ["1x1x128x128"], 1)
    with pytest.raises(InputError, match="model takes 1"):
        parse_profiles(["1x3x64x64"], [], ["1x3x128x128"], 1)


@pytest.mark.parametrize(("version", "typed", "flags"), [
    ("8.6.2", False, {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}),
    ("10.3.0", True, {"fp32": (), "fp16": (), "int8": ()}),
    ("10.16.0", True, {"fp32": (), "fp16": (), "int8": ()}),
    ("11.1.0", True, {"fp32": (), "fp16": (), "int8": ()}),
])
def test_build_plan_per_tensorrt_major(version: str, typed: bool, flags: dict[str, tuple[str, ...]]) -> None:
    for precision, graph in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"), ("int8", "model.int8.onnx")):
        plan = build_plan(precision, version)
        assert plan.graph == graph  # precision always comes from the graph
        assert plan.strongly_typed is typed
        assert plan.flags == flags[precision]
        assert plan.expect == precision


def test_build_plan_refuses_old_tensorrt() -> None:
    with pytest.raises(BackendUnavailable, match="too old"):
        build_plan("fp16", "7.2.3")


def test_cache_key_changes_with_graph_settings_gpu_and_version() -> None:
    prof = [Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512))]
    s = BuildSettings("fp16", prof, 1024, True)
    base = engine_cache_key("a" * 64, s, GPU, "10.16.0")
    assert base == engine_cache_key("a" * 64, BuildSettings("fp16", list(prof), 1024, True), dict(GPU), "10.16.0")
    variants = [
        engine_cache_key("b" * 64, s, GPU, "10.16.0"),
        engine_cache_key("a" * 64, BuildSettings("fp16", prof, 2048, True), GPU, "10.16.0"),
        engine_cache_key("a" * 64, BuildSettings("fp16", [Profile((1, 1, 64, 64), (1, 1, 128, 128),
                                                                   (8, 1, 512, 512))], 1024, True), GPU, "10.16.0"),
        engine_cache_key("a" * 64, s, {**GPU, "name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"},
                         "10.16.0"),
        engine_cache_key("a" * 64, s, GPU, "11.1.0"),
    ]
    assert len({base, *variants}) == 6


def test_workspace_default() -> None:
    assert default_workspace_mb(None) == 1024
    assert default_workspace_mb(6000) == 1500  # a quarter of free memory on an 8 GB Jetson
    assert default_workspace_mb(500) == 256
    assert default_workspace_mb(70000) == 4096


def test_layer_precision_check() -> None:
    counts = layer_precisions(inspector_json(["Half", "Half", "Float", "Row major linear FP32"]))
    assert counts == Counter({"fp16": 2, "fp32": 2})
    assert check_layer_precision("fp16", counts) is None
    assert "no convolution runs in int8" in check_layer_precision("int8", counts)
    assert check_layer_precision("int8", layer_precisions(inspector_json(["Int8 NC32HW32", "Float"]))) is None
    # What a TRT 11 engine built with a stale fp16=True flag and an FP32 graph looks like:
    assert "no fp16 layers" in check_layer_precision("fp16", layer_precisions(inspector_json(["Float"] * 5)))
    assert "no layer information" in check_layer_precision("fp16", Counter())


def test_choose_profile_and_refusal() -> None:
    profiles = [Profile((1, 1, 512, 512), (1, 1, 512, 512), (2, 1, 512, 512)).to_dict(),
                Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512)).to_dict()]
    assert choose_profile(profiles, (1, 1, 512, 512)) == (0, 1, 2)  # narrow profile preferred
    assert choose_profile(profiles, (4, 1, 512, 512)) == (1, 1, 8)  # whole batch fits profile 1
    assert choose_profile(profiles, (1, 1, 128, 96)) == (1, 1, 8)
    with pytest.raises(InputError, match=r"fits no engine profile.*64x64"):
        choose_profile(profiles, (1, 1, 1024, 512))


# ------------------------------------------------------------------------------- lint
def _qdq_graph(zp_dtype: Any = np.int8, zp_value: int = 0, weight_axis: int = 0, act_scales: int = 1,
               opset: int = 18, op: str = "Conv") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    wq_scale = numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_scale")
    wq_zp = numpy_helper.from_array(np.zeros(4, zp_dtype), "w_zp")
    a_scale = numpy_helper.from_array(np.full(act_scales, 0.1, np.float32).reshape(() if act_scales == 1
                                                                                    else (act_scales,)), "a_scale")
    a_zp = numpy_helper.from_array(np.full(() if act_scales == 1 else (act_scales,), zp_value, zp_dtype), "a_zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "a_scale", "a_zp"], ["xq"], name="q_act"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"], name="dq_act"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="q_w", axis=weight_axis),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], name="dq_w", axis=weight_axis),
        helper.make_node(op, ["xd", "wd"], ["logits"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                              initializer=[w, wq_scale, wq_zp, a_scale, a_zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_accepts_tensorrt_style_qdq() -> None:
    assert lint_model(_qdq_graph()) == []


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"zp_dtype": np.uint8}, "zero point is uint8"),
    ({"zp_value": 3}, "zero point must be 0"),
    ({"weight_axis": 1}, "per-channel axis 1"),
    ({"act_scales": 2}, "per-channel scales on an activation"),
    ({"opset": 12}, "opset 12"),
    ({"op": "LpPool"}, "will not take for this model: LpPool"),
])
def test_lint_flags_broken_graphs(kwargs: dict[str, Any], match: str) -> None:
    issues = lint_model(_qdq_graph(**kwargs))
    assert any(match in i for i in issues), issues


def test_lint_flags_fixed_dims() -> None:
    m = _qdq_graph()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 256
    assert any("dim H is fixed" in i for i in lint_model(m))


def test_tensorrt11_inspector_layout_is_read() -> None:
    """TensorRT 11 splits "Format/Datatype" into "Datatype" and "Format"."""
    trt11 = {"Layers": [layer("CaskConvolution", [{"Name": "x", "Datatype": "Half", "Format": "Channel major"}],
                               [{"Name": "y", "Datatype": "Half", "Format": "Channel major"}]),
                        layer("CaskConvolution", [{"Name": "y", "Datatype": "Float", "Format": "Linear"}],
                               [{"Name": "z", "Datatype": "Float", "Format": "Linear"}])]}
    counts = layer_precisions(trt11)
    assert counts == Counter({"fp16": 1, "fp32": 1})
    assert check_layer_precision("fp16", counts) is None
    trt10 = {"Layers": [layer("CaskConvolution", [{"Name": "x", "Format/Datatype": "Half"}],
                               [{"Name": "y", "Format/Datatype": "Half"}])]}
    assert layer_precisions(trt10) == Counter({"fp16": 1})


def test_layer_precision_is_read_from_the_first_input() -> None:
    """trex's rule: a layer runs in the precision of its first input. int8 = int8 convolutions."""
    leftover_quantize = {"Layers": [
        layer("Quantize", [{"Format/Datatype": "Float"}], [{"Format/Datatype": "Int8"}]),
        layer("CaskConvolution", [{"Format/Datatype": "Float"}], [{"Format/Datatype": "Float"}])]}
    assert "no convolution runs in int8" in check_layer_precision("int8", layer_precisions(leftover_quantize))
    int8_convs_float_out = {"Layers": [
        layer("CaskConvolution", [{"Datatype": "Int8"}], [{"Datatype": "Float"}]),
        layer("CaskConvolution", [{"Datatype": "Int8"}], [{"Datatype": "Float"}]),
        layer("PointWiseV2", [{"Datatype": "Float"}], [{"Datatype": "Float"}])]}
    counts = layer_precisions(int8_convs_float_out)
    assert counts["int8_conv"] == 2 and counts["int8"] == 2 and counts["fp32"] == 1
    assert check_layer_precision("int8", counts) is None


def test_chunked_batches_copy_each_chunk() -> None:
    from attunet_deploy.runtimes.tensorrt import run_chunks

    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    runner = ReusingRunner()
    out = run_chunks(runner.infer, x, 1, 2)
    assert runner.batches == [2, 2, 1]
    expected = np.repeat(x.mean(axis=1, keepdims=True), 2, axis=1) * 3.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_device_time_brackets_the_enqueue_only() -> None:
    """Events go on the runner's stream right around execute_async_v3, never around infer()."""
    from types import SimpleNamespace

    from attunet_deploy.runtimes.tensorrt import enqueue_times

    log: list[str] = []

    class Context:
        def execute_async_v3(self, stream: int) -> bool:
            log.append(f"execute on {stream}")
            return True

    runner = SimpleNamespace(stream=SimpleNamespace(ptr=77), context=Context(),
                             infer=lambda feed: log.append("infer"))
    times = enqueue_times(runner, 3, cudart=FakeCudart(log))
    assert times == [0.0025] * 3
    assert "infer" not in log
    for i in range(3):
        start, execute, end = log[4 * i: 4 * i + 3]
        assert start.startswith("record") and start.endswith("on 77") and execute == "execute on 77"
        assert end.startswith("record") and end != start


def test_profile_min_batch_is_honoured() -> None:
    from attunet_deploy.runtimes.tensorrt import plan_chunks, run_chunks

    profiles = [Profile((2, 1, 64, 64), (4, 1, 128, 128), (4, 1, 128, 128)).to_dict()]
    assert choose_profile(profiles, (1, 1, 128, 128)) == (0, 2, 4)
    assert plan_chunks(5, 2, 4) == [(0, 4, 0), (4, 5, 1)]
    runner = ReusingRunner(out_channels=1)
    x = np.random.default_rng(1).random((5, 1, 16, 16), dtype=np.float32)
    out = run_chunks(runner.infer, x, 2, 4)
    assert runner.batches == [4, 2] and out.shape == (5, 1, 16, 16)
    np.testing.assert_allclose(out, x * 3.0, rtol=1e-6)
    # a second profile that takes batch 1 is preferred over padding
    both = [*profiles, Profile((1, 1, 64, 64), (1, 1, 128, 128), (1, 1, 256, 256)).to_dict()]
    assert choose_profile(both, (1, 1, 128, 128)) == (1, 1, 1)


def test_device_memory_size_v2_is_used() -> None:
    from types import SimpleNamespace

    from attunet_deploy.runtimes.tensorrt import engine_device_memory_mb

    assert engine_device_memory_mb(SimpleNamespace(device_memory_size_v2=64 << 20)) == 64
    assert engine_device_memory_mb(SimpleNamespace(device_memory_size=32 << 20)) == 32
    assert engine_device_memory_mb(SimpleNamespace()) is None  # TensorRT 11 without v2: unknown, not 0


# ----------------------------------------------------------------------------- 3D (NCDHW)
def test_5d_profiles_parse_with_a_divisor_per_axis() -> None:
    (p,) = parse_profiles(("1x1x16x32x32",), ("2x1x32x48x48",), ("4x1x64x96x96",), channels=1,
                          divisor=(16, 16, 16), spatial_dims=3)
    assert p.opt == (2, 1, 32, 48, 48) and p.contains((3, 1, 48, 64, 80)) and not p.contains((1, 1, 80, 64, 64))
    with pytest.raises(InputError, match="D, H, W must be multiples of 1x16x16"):
        parse_profiles(("1x1x5x30x32",), (), ("1x1x8x32x32",), channels=1, divisor=(1, 16, 16), spatial_dims=3)
    with pytest.raises(InputError, match="NxCxDxHxW"):
        parse_profiles(("1x1x32x32",), (), ("1x1x64x64",), channels=1, divisor=(16, 16, 16), spatial_dims=3)
    idx, lo, hi = choose_profile([p.to_dict()], (7, 1, 32, 48, 48))
    assert (idx, lo, hi) == (0, 1, 4)  # a batch of 7 windows runs as chunks of at most 4


def test_volume_profile_has_the_roi_as_optimum_and_covers_the_golden_windows() -> None:
    from attunet_deploy.build.tensorrt import volume_profile

    p = volume_profile(1, (32, 48, 48), 2, cover=[(8, 1, 32, 64, 64), (2, 1, 32, 64, 64)])
    assert p.opt == (2, 1, 32, 48, 48) and p.min == (1, 1, 32, 48, 48) and p.max == (8, 1, 32, 64, 64)
    assert all(p.contains(s) for s in [(1, 1, 32, 48, 48), (8, 1, 32, 64, 64)])
    (q,) = parse_profiles((), (), (), channels=1, spatial_dims=3, default=p)
    assert q == p


def test_engine_memory_estimate_refuses_what_an_8gb_jetson_cannot_hold() -> None:
    from attunet_deploy.build.tensorrt import check_engine_fits, estimate_engine_mb
    from attunet_deploy.errors import BuildFailed

    small = Profile((1, 1, 32, 48, 48), (1, 1, 32, 48, 48), (1, 1, 32, 48, 48))
    big = Profile((1, 1, 96, 96, 96), (4, 1, 128, 128, 128), (4, 1, 128, 128, 128))
    # the paper's CT network at feature_scale 4 (16 channels at full resolution), 8 GB Jetson with 6 GB free
    fp32 = estimate_engine_mb(big.max, 16, "fp32", 10 << 20)
    assert fp32 > 4 * estimate_engine_mb(big.max, 16, "fp32", 0) // 4  # weights add to it
    assert estimate_engine_mb(big.max, 16, "fp16", 0) < fp32  # half the activation bytes
    assert check_engine_fits([small], 16, "fp32", 10 << 20, 1024, 6144) < 100
    with pytest.raises(BuildFailed, match=r"needs about \d+ MB .* 4x1x128x128x128 .* 6144 MB free: lower --max-shape"):
        check_engine_fits([small, big], 16, "fp32", 10 << 20, 1024, 6144)
    assert check_engine_fits([big], 16, "fp32", 10 << 20, 1024, None) == fp32  # unknown free memory: no refusal


def _graph_3d(*nodes: Any, inits: list[Any] = ()) -> Any:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])
    g = helper.make_graph(list(nodes), "g3d", [x], [y], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_lint_takes_a_3d_network_and_flags_what_tensorrt_refuses_in_3d() -> None:
    w = numpy_helper.from_array(np.ones((1, 1, 3, 3, 3), np.float32), "w")
    good_scales = numpy_helper.from_array(np.array([1, 1, 2, 2, 2], np.float32), "s")
    bad_scales = numpy_helper.from_array(np.array([1, 2, 2, 2, 2], np.float32), "sb")
    conv = helper.make_node("Conv", ["image", "w"], ["c"], kernel_shape=[3, 3, 3], pads=[1] * 6, name="conv3d")
    pool = helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2, 2], strides=[2, 2, 2], name="pool3d")
    up = helper.make_node("Resize", ["p", "", "s"], ["logits"], mode="linear", name="trilinear")
    assert lint_model(_graph_3d(conv, pool, up, inits=[w, good_scales])) == []
    pool_dil = helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2, 2], dilations=[2, 2, 2], name="pool3d")
    up_bad = helper.make_node("Resize", ["p", "", "sb"], ["logits"], mode="linear", name="trilinear")
    issues = lint_model(_graph_3d(conv, pool_dil, up_bad, inits=[w, bad_scales]))
    assert any("MaxPool with dilations" in i for i in issues)
    assert any("beyond the 3 innermost axes" in i for i in issues)
    conv4 = helper.make_node("Conv", ["image", "w"], ["logits"], kernel_shape=[1, 3, 3, 3], name="conv4d")
    assert any("over 4 spatial dims" in i for i in lint_model(_graph_3d(conv4, inits=[w])))
