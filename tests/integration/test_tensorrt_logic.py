"""CPU-side tests of OUR TensorRT decisions on real bundles: engine cache and lookup in the bundle,
no-GPU paths, ONNX Runtime's TensorRT provider options, the CLI's one-line build failures.

Where TensorRT itself would be called, a stand-in (``_StandInTensorRT``) returns canned bytes and
canned inspector JSON. It tests our bookkeeping only and is no evidence that TensorRT works;
the `gpu`-marked tests in tests/gpu are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from trtstandins import GPU, ReusingRunner, inspector_json

from attunet_deploy.build.tensorrt import (
    BuildSettings,
    Profile,
    engine_cache_key,
    parse_profiles,
)
from attunet_deploy.build.trt_lint import lint_onnx
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import BackendUnavailable, BuildFailed, InputError
from attunet_deploy.runtimes.tensorrt import choose_profile, find_engine
from attunet_deploy.steps import engines as trt_export


def test_find_engine_reports_wrong_gpu_or_version(small_bundle: Path) -> None:
    b = Bundle.load(small_bundle)
    assert find_engine(b, "fp16", GPU, "10.16.0")[0] is None
    b.manifest["artifacts"]["engines/fp16-x.engine"] = {"kind": "tensorrt-engine", "precision": "fp16", "gpu": GPU,
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
        return b"stand-in engine %d" % self.builds, inspector_json(self.kinds)


def test_engine_cache_reuse_and_stale_rebuild(monkeypatch: pytest.MonkeyPatch, bundle_copy: Path) -> None:
    fake = _StandInTensorRT(monkeypatch, ["Float", "Float"])
    b = Bundle.load(bundle_copy)
    (r1,) = trt_export.build_engines(b, ["fp32"]).engines
    assert r1.status == "built" and fake.builds == 1
    assert fake.last_settings.workspace_mb == 2000 and fake.last_plan.strongly_typed
    entry = Bundle.load(bundle_copy).manifest["artifacts"][r1.engine]
    assert entry["gpu"] == GPU and entry["tensorrt"] == "10.16.0" and entry["profiles"]
    (r2,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"]).engines
    assert r2.status == "cached" and fake.builds == 1
    narrow = parse_profiles(["1x1x256x256"], [], ["1x1x256x256"], 1)
    (r3,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"], narrow).engines
    assert r3.status == "built" and r3.engine != r1.engine and fake.builds == 2
    engines = [n for n, e in Bundle.load(bundle_copy).manifest["artifacts"].items() if e["kind"] == "tensorrt-engine"]
    assert engines == [r3.engine] and not (bundle_copy / r1.engine).exists()


def test_engine_without_requested_precision_is_not_kept(monkeypatch: pytest.MonkeyPatch, bundle_copy: Path) -> None:
    _StandInTensorRT(monkeypatch, ["Float"] * 4)
    b = Bundle.load(bundle_copy)
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    quantize_bundle(b, QuantizeSettings(precisions=("fp16",), verify=False))
    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(BuildFailed, match="no fp16 layers"):
        trt_export.build_engines(Bundle.load(bundle_copy), ["fp16"])
    assert (bundle_copy / "manifest.json").read_bytes() == before  # nothing committed
    assert not any(e["kind"] == "tensorrt-engine" for e in Bundle.load(bundle_copy).manifest["artifacts"].values())


def test_build_without_tensorrt_is_unavailable(small_bundle: Path) -> None:
    from attunet_deploy.environment import tensorrt_probe

    if tensorrt_probe().available:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailable, match="cannot build TensorRT engines here"):
        trt_export.build_engines(Bundle.load(small_bundle), ["fp32"])


def test_lint_on_exported_and_quantised_graphs(bundle_copy: Path) -> None:
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    b = Bundle.load(bundle_copy)
    rng = np.random.default_rng(0)
    np.save(bundle_copy.parent / "calib.npy", rng.random((4, 1, 64, 64), dtype=np.float32))
    quantize_bundle(b, QuantizeSettings(calib=str(bundle_copy.parent / "calib.npy"), verify=False))
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert lint_onnx(bundle_copy / name) == [], name
        assert Bundle.load(bundle_copy).manifest["artifacts"][name].get("trt_lint", []) == []


def test_bench_takes_device_time_from_enqueue_timing(small_bundle: Path) -> None:
    """bench reports device_latency_ms from device_compute_times (after the host loop)."""
    from attunet_deploy.judge.bench import BenchSettings, bench_runners
    from attunet_deploy.runtimes.onnxruntime import OrtCpuRunner

    calls: list[int] = []

    class Timed(OrtCpuRunner):
        def device_compute_times(self, padded: np.ndarray, iterations: int) -> list[float]:
            calls.append(iterations)
            return [0.001] * iterations

    with Timed(Bundle.load(small_bundle), "fp32") as r:
        (res,) = bench_runners([r], BenchSettings(shape=(1, 1, 32, 32), warmup=0, iterations=4))
    assert calls == [4]
    assert res.device_latency_ms is not None and res.device_latency_ms["p50"] == pytest.approx(1.0)
    assert "CUDA events around the enqueue" in res.timing


def test_gpu_test_inputs_fit_the_profiles_they_build() -> None:
    import test_gpu

    narrow = parse_profiles([test_gpu.NARROW_MIN], [], [test_gpu.NARROW_MAX], channels=1)
    from attunet_deploy.preprocess import padded_size

    h, w = padded_size(*test_gpu.CHUNKED_INPUT[2:], 16)
    idx, lo, hi = choose_profile([p.to_dict() for p in narrow], (test_gpu.CHUNKED_INPUT[0], 1, h, w))
    assert idx == 0 and (lo, hi) == (1, 2)
    with pytest.raises(InputError, match="fits no engine profile"):
        choose_profile([p.to_dict() for p in narrow], (1, 1, *padded_size(*test_gpu.OUTSIDE_INPUT[2:], 16)))


def test_default_workspace_stays_out_of_the_cache_key(monkeypatch: pytest.MonkeyPatch,
                                                               bundle_copy: Path) -> None:
    prof = [Profile((1, 1, 64, 64), (1, 1, 256, 256), (8, 1, 512, 512))]
    a = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1500, True, workspace_explicit=False), GPU, "10.3.0")
    b = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1100, True, workspace_explicit=False), GPU, "10.3.0")
    c = engine_cache_key("a" * 64, BuildSettings("fp32", prof, 1100, True, workspace_explicit=True), GPU, "10.3.0")
    assert a == b and c != b
    fake = _StandInTensorRT(monkeypatch, ["Float"])
    trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"])
    fake.free_mb = 5000  # free memory moved between two runs on a GPU under 16 GB
    (again,) = trt_export.build_engines(Bundle.load(bundle_copy), ["fp32"]).engines
    assert again.status == "cached" and fake.builds == 1


def test_ort_trt_builds_strongly_typed(monkeypatch: pytest.MonkeyPatch, small_bundle: Path) -> None:
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


def test_ort_trt_cache_is_keyed_by_graph_and_cleared_by_quantize(bundle_copy: Path) -> None:
    from attunet_deploy.runtimes.onnxruntime import OrtTensorrtRunner
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    rng = np.random.default_rng(0)
    calib_a, calib_b = bundle_copy.parent / "a.npy", bundle_copy.parent / "b.npy"
    np.save(calib_a, rng.random((3, 1, 48, 48), dtype=np.float32))
    np.save(calib_b, 5 * rng.random((3, 1, 48, 48), dtype=np.float32))
    quantize_bundle(Bundle.load(bundle_copy), QuantizeSettings(calib=str(calib_a), precisions=("int8",), verify=False))
    first = OrtTensorrtRunner(Bundle.load(bundle_copy), "int8")._providers()[0][1]["trt_engine_cache_path"]
    (Path(first) / "TensorrtExecutionProvider_cache.engine").write_bytes(b"old engine")
    quantize_bundle(Bundle.load(bundle_copy), QuantizeSettings(calib=str(calib_b), precisions=("int8",), verify=False))
    second = OrtTensorrtRunner(Bundle.load(bundle_copy), "int8")._providers()[0][1]["trt_engine_cache_path"]
    assert first != second
    assert not Path(first).exists()  # the re-calibrated graph never meets the old engine


def test_polygraphy_exception_is_a_one_line_build_failure(monkeypatch: pytest.MonkeyPatch,
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


def test_one_context_per_profile_shared_by_threads(monkeypatch: pytest.MonkeyPatch,
                                                            small_bundle: Path) -> None:
    import sys
    import threading
    import types

    from attunet_deploy.runtimes.tensorrt import TensorrtRunner

    created: list[dict[str, Any]] = []

    class FakeTrtRunner(ReusingRunner):
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
