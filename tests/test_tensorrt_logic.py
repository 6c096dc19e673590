"""CPU-side tests of OUR TensorRT decisions: profiles, build plan per TensorRT major, cache key,
workspace, layer-precision check, engine lookup, lint, no-GPU paths.

Where TensorRT itself would be called, a stand-in (``_StandInTensorRT``) returns canned bytes and
canned inspector JSON. It tests our bookkeeping only and is no evidence that TensorRT works;
the `gpu`-marked tests in test_gpu.py are.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import BackendUnavailable, InputError, VerificationFailed
from attunet_deploy.export import tensorrt as trt_export
from attunet_deploy.export.tensorrt import (
    BuildSettings,
    Profile,
    build_plan,
    check_layer_precision,
    default_workspace_mb,
    engine_cache_key,
    layer_precisions,
    parse_profiles,
)
from attunet_deploy.export.trt_lint import lint_model, lint_onnx
from attunet_deploy.runtimes.tensorrt import choose_profile, find_engine

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


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


def _inspector(kinds: list[str]) -> dict[str, Any]:
    return {"Layers": [{"Name": f"l{i}", "LayerType": "CaskConvolution",
                        "Outputs": [{"Name": "t", "Format/Datatype": k}]} for i, k in enumerate(kinds)]
            + [{"Name": "r", "LayerType": "Reformat", "Outputs": [{"Format/Datatype": "Int8"}]}]}


def test_layer_precision_check() -> None:
    counts = layer_precisions(_inspector(["Half", "Half", "Float", "Row major linear FP32"]))
    assert counts == Counter({"fp16": 2, "fp32": 2})
    assert check_layer_precision("fp16", counts) is None
    assert "no int8 layers" in check_layer_precision("int8", counts)
    assert check_layer_precision("int8", layer_precisions(_inspector(["Int8 NC32HW32", "Float"]))) is None
    # What a TRT 11 engine built with a stale fp16=True flag and an FP32 graph looks like:
    assert "no fp16 layers" in check_layer_precision("fp16", layer_precisions(_inspector(["Float"] * 5)))
    assert "no layer information" in check_layer_precision("fp16", Counter())


def test_choose_profile_and_refusal() -> None:
    profiles = [Profile((1, 1, 512, 512), (1, 1, 512, 512), (2, 1, 512, 512)).to_dict(),
                Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512)).to_dict()]
    assert choose_profile(profiles, (1, 1, 512, 512)) == (0, 2)  # narrow profile preferred
    assert choose_profile(profiles, (4, 1, 512, 512)) == (1, 8)  # whole batch fits profile 1
    assert choose_profile(profiles, (1, 1, 128, 96)) == (1, 8)
    with pytest.raises(InputError, match=r"fits no engine profile.*64x64"):
        choose_profile(profiles, (1, 1, 1024, 512))


def test_find_engine_reports_wrong_gpu_or_version(small_bundle: Path) -> None:
    b = Bundle.load(small_bundle)
    assert find_engine(b, "fp16", GPU, "10.16.0")[0] is None
    b.artifacts["engines/fp16-x.engine"] = {"kind": "tensorrt-engine", "precision": "fp16", "gpu": GPU,
                                            "tensorrt": "10.16.0"}
    assert find_engine(b, "fp16", GPU, "10.16.0")[0] == "engines/fp16-x.engine"
    name, reason = find_engine(b, "fp16", {"name": "Orin", "compute_capability": "8.7"}, "10.3.0")
    assert name is None and "not portable" in reason and "attdeploy build" in reason
    assert find_engine(b, "fp16", GPU, "11.1.0")[0] is None


class _StandInTensorRT:
    """Stand-in for TensorRT + a GPU: NOT evidence that TensorRT works (see module docstring)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kinds: list[str], version: str = "10.16.0") -> None:
        self.builds = 0
        self.kinds = kinds
        monkeypatch.setattr(trt_export, "require_tensorrt", lambda: (version, dict(GPU)))
        monkeypatch.setattr(trt_export, "free_device_memory_mb", lambda: 8000)
        monkeypatch.setattr(trt_export, "_build_with_polygraphy", self._build)

    def _build(self, bundle: Bundle, graph: Path, plan: Any, settings: Any, version: str) -> tuple[bytes, dict]:
        self.builds += 1
        self.last_plan, self.last_settings = plan, settings
        return b"stand-in engine %d" % self.builds, _inspector(self.kinds)


def test_engine_cache_reuse_and_stale_rebuild(monkeypatch: pytest.MonkeyPatch, bundle_copy: Path) -> None:
    fake = _StandInTensorRT(monkeypatch, ["Float", "Float"])
    b = Bundle.load(bundle_copy)
    (r1,) = trt_export.build_engines(b, ["fp32"])
    assert r1["status"] == "built" and fake.builds == 1
    assert fake.last_settings.workspace_mb == 2000 and fake.last_plan.strongly_typed
    entry = Bundle.load(bundle_copy).artifacts[r1["engine"]]
    assert entry["gpu"] == GPU and entry["tensorrt"] == "10.16.0" and entry["profiles"]
    (r2,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"])
    assert r2["status"] == "cached" and fake.builds == 1
    narrow = parse_profiles(["1x1x256x256"], [], ["1x1x256x256"], 1)
    (r3,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"], narrow)
    assert r3["status"] == "built" and r3["engine"] != r1["engine"] and fake.builds == 2
    engines = [n for n, e in Bundle.load(bundle_copy).artifacts.items() if e["kind"] == "tensorrt-engine"]
    assert engines == [r3["engine"]] and not (bundle_copy / r1["engine"]).exists()


def test_engine_without_requested_precision_is_not_kept(monkeypatch: pytest.MonkeyPatch, bundle_copy: Path) -> None:
    _StandInTensorRT(monkeypatch, ["Float"] * 4)
    b = Bundle.load(bundle_copy)
    from attunet_deploy.export.quantize import quantize_bundle

    quantize_bundle(b, precisions=["fp16"], verify=False)
    with pytest.raises(VerificationFailed, match="no fp16 layers"):
        trt_export.build_engines(Bundle.load(bundle_copy), ["fp16"])
    assert not any(e["kind"] == "tensorrt-engine" for e in Bundle.load(bundle_copy).artifacts.values())


def test_build_without_tensorrt_is_unavailable(small_bundle: Path) -> None:
    from attunet_deploy.environment import tensorrt_probe

    if tensorrt_probe().available:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailable, match="cannot build TensorRT engines here"):
        trt_export.build_engines(Bundle.load(small_bundle), ["fp32"])


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


def test_lint_on_exported_and_quantised_graphs(bundle_copy: Path) -> None:
    from attunet_deploy.export.quantize import quantize_bundle

    b = Bundle.load(bundle_copy)
    rng = np.random.default_rng(0)
    np.save(bundle_copy.parent / "calib.npy", rng.random((4, 1, 64, 64), dtype=np.float32))
    quantize_bundle(b, calib=str(bundle_copy.parent / "calib.npy"), verify=False)
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert lint_onnx(bundle_copy / name) == [], name
        assert Bundle.load(bundle_copy).artifacts[name].get("trt_lint", []) == []
