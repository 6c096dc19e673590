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
from attunet_deploy.errors import BackendUnavailable, BuildFailed, InputError
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
    """TensorRT 10 layout: one combined "Format/Datatype" string per tensor; conv inputs = outputs."""
    return {"Layers": [{"Name": f"l{i}", "LayerType": "CaskConvolution",
                        "Inputs": [{"Name": "x", "Format/Datatype": k}],
                        "Outputs": [{"Name": "t", "Format/Datatype": k}]} for i, k in enumerate(kinds)]
            + [{"Name": "r", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Float"}],
                "Outputs": [{"Format/Datatype": "Int8"}]}]}


def test_layer_precision_check() -> None:
    counts = layer_precisions(_inspector(["Half", "Half", "Float", "Row major linear FP32"]))
    assert counts == Counter({"fp16": 2, "fp32": 2})
    assert check_layer_precision("fp16", counts) is None
    assert "no convolution runs in int8" in check_layer_precision("int8", counts)
    assert check_layer_precision("int8", layer_precisions(_inspector(["Int8 NC32HW32", "Float"]))) is None
    # What a TRT 11 engine built with a stale fp16=True flag and an FP32 graph looks like:
    assert "no fp16 layers" in check_layer_precision("fp16", layer_precisions(_inspector(["Float"] * 5)))
    assert "no layer information" in check_layer_precision("fp16", Counter())


def test_choose_profile_and_refusal() -> None:
    profiles = [Profile((1, 1, 512, 512), (1, 1, 512, 512), (2, 1, 512, 512)).to_dict(),
                Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512)).to_dict()]
    assert choose_profile(profiles, (1, 1, 512, 512)) == (0, 1, 2)  # narrow profile preferred
    assert choose_profile(profiles, (4, 1, 512, 512)) == (1, 1, 8)  # whole batch fits profile 1
    assert choose_profile(profiles, (1, 1, 128, 96)) == (1, 1, 8)
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
        self.free_mb = 8000
        self.raise_exc: BaseException | None = None
        monkeypatch.setattr(trt_export, "require_tensorrt", lambda: (version, dict(GPU)))
        monkeypatch.setattr(trt_export, "free_device_memory_mb", lambda: self.free_mb)
        monkeypatch.setattr(trt_export, "_build_with_polygraphy", self._build)

    def _build(self, bundle: Bundle, txn: Any, plan: Any, settings: Any, version: str) -> tuple[bytes, dict]:
        self.builds += 1
        if self.raise_exc is not None:
            raise self.raise_exc
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
    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(BuildFailed, match="no fp16 layers"):
        trt_export.build_engines(Bundle.load(bundle_copy), ["fp16"])
    assert (bundle_copy / "manifest.json").read_bytes() == before  # nothing committed
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


# =============================================================================== issue 11: the twelve defects
# Each test below fails on the code of the landing before issue 11 and passes after it. Where
# TensorRT, Polygraphy or CUDA would be called, the tests use stand-ins that imitate *their
# documented behaviour* (read from Polygraphy 0.49.27's TrtRunner and TensorRT's inspector
# JSON): they test our logic only and are no evidence that TensorRT works.

def _layer(kind: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Name": kind, "LayerType": kind, "Inputs": inputs, "Outputs": outputs}


def test_defect01_tensorrt11_inspector_layout_is_read() -> None:
    """TensorRT 11 splits "Format/Datatype" into "Datatype" and "Format"."""
    trt11 = {"Layers": [_layer("CaskConvolution", [{"Name": "x", "Datatype": "Half", "Format": "Channel major"}],
                               [{"Name": "y", "Datatype": "Half", "Format": "Channel major"}]),
                        _layer("CaskConvolution", [{"Name": "y", "Datatype": "Float", "Format": "Linear"}],
                               [{"Name": "z", "Datatype": "Float", "Format": "Linear"}])]}
    counts = layer_precisions(trt11)
    assert counts == Counter({"fp16": 1, "fp32": 1})
    assert check_layer_precision("fp16", counts) is None
    trt10 = {"Layers": [_layer("CaskConvolution", [{"Name": "x", "Format/Datatype": "Half"}],
                               [{"Name": "y", "Format/Datatype": "Half"}])]}
    assert layer_precisions(trt10) == Counter({"fp16": 1})


def test_defect02_precision_is_read_from_the_first_input() -> None:
    """trex's rule: a layer runs in the precision of its first input. int8 = int8 convolutions."""
    leftover_quantize = {"Layers": [
        _layer("Quantize", [{"Format/Datatype": "Float"}], [{"Format/Datatype": "Int8"}]),
        _layer("CaskConvolution", [{"Format/Datatype": "Float"}], [{"Format/Datatype": "Float"}])]}
    assert "no convolution runs in int8" in check_layer_precision("int8", layer_precisions(leftover_quantize))
    int8_convs_float_out = {"Layers": [
        _layer("CaskConvolution", [{"Datatype": "Int8"}], [{"Datatype": "Float"}]),
        _layer("CaskConvolution", [{"Datatype": "Int8"}], [{"Datatype": "Float"}]),
        _layer("PointWiseV2", [{"Datatype": "Float"}], [{"Datatype": "Float"}])]}
    counts = layer_precisions(int8_convs_float_out)
    assert counts["int8_conv"] == 2 and counts["int8"] == 2 and counts["fp32"] == 1
    assert check_layer_precision("int8", counts) is None


class _ReusingRunner:
    """Polygraphy-style infer(): outputs are views of one host buffer reused (and resized)
    by the next call, as TrtRunner._get_array_on_cpu does."""

    def __init__(self, out_channels: int = 2) -> None:
        self.buffer = np.empty(0, np.uint8)
        self.k = out_channels
        self.batches: list[int] = []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["image"]
        self.batches.append(x.shape[0])
        y = np.repeat(x.mean(axis=1, keepdims=True), self.k, axis=1).astype(np.float32) * 3.0
        nbytes = y.nbytes
        self.buffer.resize((nbytes,), refcheck=False)
        view = self.buffer[:nbytes].view(np.float32).reshape(y.shape)
        view[...] = y
        return {"logits": view}


def test_defect03_chunked_batches_copy_each_chunk() -> None:
    from attunet_deploy.runtimes.tensorrt import run_chunks

    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    runner = _ReusingRunner()
    out = run_chunks(runner.infer, x, 1, 2)
    assert runner.batches == [2, 2, 1]
    expected = np.repeat(x.mean(axis=1, keepdims=True), 2, axis=1) * 3.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)


class _FakeCudart:
    """Records the order of CUDA calls; elapsed time is fixed at 2.5 ms."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.events = 0

    def cudaEventCreate(self) -> tuple[int, str]:
        self.events += 1
        return 0, f"ev{self.events}"

    def cudaEventRecord(self, event: str, stream: int) -> tuple[int]:
        self.log.append(f"record {event} on {stream}")
        return (0,)

    def cudaEventSynchronize(self, event: str) -> tuple[int]:
        self.log.append("sync")
        return (0,)

    def cudaEventElapsedTime(self, a: str, b: str) -> tuple[int, float]:
        return 0, 2.5

    def cudaEventDestroy(self, event: str) -> tuple[int]:
        return (0,)


def test_defect04_device_time_brackets_the_enqueue_only() -> None:
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
    times = enqueue_times(runner, 3, cudart=_FakeCudart(log))
    assert times == [0.0025] * 3
    assert "infer" not in log
    for i in range(3):
        start, execute, end = log[4 * i: 4 * i + 3]
        assert start.startswith("record") and start.endswith("on 77") and execute == "execute on 77"
        assert end.startswith("record") and end != start


def test_defect04_bench_takes_device_time_from_enqueue_timing(small_bundle: Path) -> None:
    """bench reports device_latency_ms from device_compute_times (after the host loop)."""
    from attunet_deploy.bench import BenchSettings, bench_runners
    from attunet_deploy.runtimes.onnxruntime import OrtCpuRunner

    calls: list[int] = []

    class Timed(OrtCpuRunner):
        def device_compute_times(self, padded: np.ndarray, iterations: int) -> list[float]:
            calls.append(iterations)
            return [0.001] * iterations

    with Timed(Bundle.load(small_bundle), "fp32") as r:
        (res,) = bench_runners([r], BenchSettings(shape=(1, 1, 32, 32), warmup=0, iterations=4))
    assert calls == [4]
    assert res["device_latency_ms"]["p50"] == pytest.approx(1.0)
    assert "CUDA events around the enqueue" in res["timing"]


def test_defect05_gpu_test_inputs_fit_the_profiles_it_builds() -> None:
    import test_gpu

    narrow = parse_profiles([test_gpu.NARROW_MIN], [], [test_gpu.NARROW_MAX], channels=1)
    from attunet_deploy.preprocess import padded_size

    h, w = padded_size(*test_gpu.CHUNKED_INPUT[2:], 16)
    idx, lo, hi = choose_profile([p.to_dict() for p in narrow], (test_gpu.CHUNKED_INPUT[0], 1, h, w))
    assert idx == 0 and (lo, hi) == (1, 2)
    with pytest.raises(InputError, match="fits no engine profile"):
        choose_profile([p.to_dict() for p in narrow], (1, 1, *padded_size(*test_gpu.OUTSIDE_INPUT[2:], 16)))


def test_defect06_default_workspace_stays_out_of_the_cache_key(monkeypatch: pytest.MonkeyPatch,
                                                               bundle_copy: Path) -> None:
    prof = [Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512))]
    a = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1500, True, workspace_explicit=False), GPU, "10.3.0")
    b = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1100, True, workspace_explicit=False), GPU, "10.3.0")
    c = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1100, True, workspace_explicit=True), GPU, "10.3.0")
    assert a == b and c != b
    fake = _StandInTensorRT(monkeypatch, ["Float"])
    trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"])
    fake.free_mb = 5000  # free memory moved between two runs on a GPU under 16 GB
    (again,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"])
    assert again["status"] == "cached" and fake.builds == 1


def test_defect07_ort_trt_builds_strongly_typed(monkeypatch: pytest.MonkeyPatch, small_bundle: Path) -> None:
    from attunet_deploy.runtimes import onnxruntime as ort_rt

    assert not ort_rt.ort_trt_needs_flags("1.32.0", None)
    assert not ort_rt.ort_trt_needs_flags("1.20.1", "10.3.0")
    assert ort_rt.ort_trt_needs_flags("1.17.1", None)  # TensorRT 8.6 behind the EP (JetPack 6.0)
    assert ort_rt.ort_trt_needs_flags("1.32.0", "8.6.2")
    runner = ort_rt.OrtTensorrtRunner(Bundle.load(small_bundle), "fp32")
    monkeypatch.setattr(ort_rt, "module_version", lambda name: None)
    monkeypatch.setattr(ort_rt, "_ort_version", lambda: "1.32.0")
    (_, opts), *_ = runner._providers()
    assert "trt_fp16_enable" not in opts and "trt_int8_enable" not in opts


def test_defect08_ort_trt_cache_is_keyed_by_graph_and_cleared_by_quantize(bundle_copy: Path) -> None:
    from attunet_deploy.export.quantize import quantize_bundle
    from attunet_deploy.runtimes.onnxruntime import OrtTensorrtRunner

    rng = np.random.default_rng(0)
    calib_a, calib_b = bundle_copy.parent / "a.npy", bundle_copy.parent / "b.npy"
    np.save(calib_a, rng.random((3, 1, 48, 48), dtype=np.float32))
    np.save(calib_b, 5 * rng.random((3, 1, 48, 48), dtype=np.float32))
    quantize_bundle(Bundle.load(bundle_copy), calib=str(calib_a), precisions=["int8"], verify=False)
    first = OrtTensorrtRunner(Bundle.load(bundle_copy), "int8")._providers()[0][1]["trt_engine_cache_path"]
    (Path(first) / "TensorrtExecutionProvider_cache.engine").write_bytes(b"old engine")
    quantize_bundle(Bundle.load(bundle_copy), calib=str(calib_b), precisions=["int8"], verify=False)
    second = OrtTensorrtRunner(Bundle.load(bundle_copy), "int8")._providers()[0][1]["trt_engine_cache_path"]
    assert first != second
    assert not Path(first).exists()  # the re-calibrated graph never meets the old engine


def test_defect09_profile_min_batch_is_honoured() -> None:
    from attunet_deploy.runtimes.tensorrt import plan_chunks, run_chunks

    profiles = [Profile((2, 1, 64, 64), (4, 1, 128, 128), (4, 1, 128, 128)).to_dict()]
    assert choose_profile(profiles, (1, 1, 128, 128)) == (0, 2, 4)
    assert plan_chunks(5, 2, 4) == [(0, 4, 0), (4, 5, 1)]
    runner = _ReusingRunner(out_channels=1)
    x = np.random.default_rng(1).random((5, 1, 16, 16), dtype=np.float32)
    out = run_chunks(runner.infer, x, 2, 4)
    assert runner.batches == [4, 2] and out.shape == (5, 1, 16, 16)
    np.testing.assert_allclose(out, x * 3.0, rtol=1e-6)
    # a second profile that takes batch 1 is preferred over padding
    both = [*profiles, Profile((1, 1, 64, 64), (1, 1, 128, 128), (1, 1, 256, 256)).to_dict()]
    assert choose_profile(both, (1, 1, 128, 128)) == (1, 1, 1)


def test_defect10_device_memory_size_v2() -> None:
    from types import SimpleNamespace

    from attunet_deploy.runtimes.tensorrt import engine_device_memory_mb

    assert engine_device_memory_mb(SimpleNamespace(device_memory_size_v2=64 << 20)) == 64
    assert engine_device_memory_mb(SimpleNamespace(device_memory_size=32 << 20)) == 32
    assert engine_device_memory_mb(SimpleNamespace()) is None  # TensorRT 11 without v2: unknown, not 0


def test_defect11_polygraphy_exception_is_a_one_line_build_failure(monkeypatch: pytest.MonkeyPatch,
                                                                   bundle_copy: Path) -> None:
    from click.testing import CliRunner

    from attunet_deploy.cli import main

    class PolygraphyException(Exception):  # what G_LOGGER.critical raises
        pass

    fake = _StandInTensorRT(monkeypatch, ["Float"])
    fake.raise_exc = PolygraphyException("Invalid Engine. Please ensure the engine was built correctly")
    before = (bundle_copy / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["build", "-b", str(bundle_copy), "--precision", "fp32"])
    assert result.exit_code == 1, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "TensorRT could not build the fp32 engine" in lines[0]
    assert "unexpected" not in result.stderr
    assert (bundle_copy / "manifest.json").read_bytes() == before


def test_defect12_one_context_per_profile_shared_by_threads(monkeypatch: pytest.MonkeyPatch,
                                                            small_bundle: Path) -> None:
    import sys
    import threading
    import types

    from attunet_deploy.runtimes.tensorrt import TensorrtRunner

    created: list[dict[str, Any]] = []

    class FakeTrtRunner(_ReusingRunner):
        def __init__(self, engine: Any, **kwargs: Any) -> None:
            super().__init__(out_channels=2)
            created.append(kwargs)

        def activate(self) -> None:
            pass

    mod = types.ModuleType("polygraphy.backend.trt")
    mod.TrtRunner = FakeTrtRunner
    for name in ("polygraphy", "polygraphy.backend"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", mod)
    r = TensorrtRunner(Bundle.load(small_bundle), "fp32")
    profiles = [Profile((1, 1, 64, 64), (1, 1, 64, 64), (2, 1, 64, 64)).to_dict(),
                Profile((1, 1, 128, 128), (1, 1, 128, 128), (2, 1, 128, 128)).to_dict()]
    r._engine, r._profiles, r._trt_version, r._entry = object(), profiles, "10.16.0", {}
    r._profile_locks = [threading.Lock(), threading.Lock()]
    r._contexts, r._contexts_lock, r._gpu = {}, threading.Lock(), "stand-in"
    r.is_active = True
    xs = [np.ones((1, 1, 64, 64), np.float32), np.ones((2, 1, 120, 128), np.float32)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(10):
                x = xs[k % 2]
                assert r.infer(x).shape == (x.shape[0], 2, *x.shape[2:])
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(created) == 2  # one context per profile, not threads x profiles
    assert all(kw["allocation_strategy"] == "profile" for kw in created)
