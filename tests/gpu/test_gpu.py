"""GPU tests: real TensorRT engines and ONNX Runtime GPU providers. Skipped with a reason when
TensorRT, CUDA or onnxruntime-gpu is missing (see conftest.py); these are the evidence that the
TensorRT path works, not the stand-in in test_tensorrt_logic.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from attunet_deploy import load_runner
from attunet_deploy.bundle import Bundle
from attunet_deploy.judge.bench import BenchSettings, bench_runner
from attunet_deploy.judge.verify import verify

#: The narrow profile test_engine_cache_reused_and_profile_bounds_enforced builds, an input that
#: pads to 5x1x128x112 (inside it, run as chunks of 2) and one outside it. test_tensorrt_logic checks
#: on the CPU that these stay consistent (test_gpu_test_inputs_fit_the_profiles_they_build).
NARROW_MIN, NARROW_MAX = "1x1x64x64", "2x1x128x128"
CHUNKED_INPUT = (5, 1, 120, 100)
OUTSIDE_INPUT = (1, 1, 300, 300)


@pytest.fixture(scope="module")
def gpu_demo(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Path) -> Path:
    dst = tmp_path_factory.mktemp("gpu") / "demo"
    shutil.copytree(demo_bundle, dst)
    return dst


@pytest.mark.gpu(needs="tensorrt")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_builds_verifies_and_benches(gpu_demo: Path, precision: str) -> None:
    from attunet_deploy.steps.engines import build_engines

    (built,) = build_engines(Bundle.load(gpu_demo), [precision]).engines
    assert built["status"] in ("built", "cached")
    counts = built["layer_precisions"]
    if precision != "fp32":
        assert counts.get(precision, 0) > 0, counts  # the engine really runs the precision asked for
    (row,) = verify(Bundle.load(gpu_demo), ["trt"], [precision])
    assert row["status"] == "pass", row
    with load_runner(gpu_demo, backend="trt", precision=precision) as runner:
        result = bench_runner(runner, BenchSettings(shape=(1, 1, 256, 256), warmup=5, iterations=50))
    assert result["latency_ms"]["p50"] > 0 and result["device"].startswith("cuda")
    print(f"\ntrt/{precision}: layers {counts}, rel_l2 {row['rel_l2']:.2e}, mean Dice {row['mean_dice']:.4f}, "
          f"p50 {result['latency_ms']['p50']:.3f} ms, device p50 "
          f"{result.get('device_latency_ms', {}).get('p50', float('nan')):.3f} ms")


@pytest.mark.gpu(needs="tensorrt")
def test_engine_cache_reused_and_profile_bounds_enforced(gpu_demo: Path) -> None:
    from attunet_deploy.build.tensorrt import parse_profiles
    from attunet_deploy.errors import InputError
    from attunet_deploy.steps.engines import build_engines

    build_engines(Bundle.load(gpu_demo), ["fp16"])
    (again,) = build_engines(Bundle.load(gpu_demo), ["fp16"]).engines
    assert again["status"] == "cached"
    narrow = parse_profiles([NARROW_MIN], [], [NARROW_MAX], channels=1)
    build_engines(Bundle.load(gpu_demo), ["fp32"], narrow, force=True)
    x = np.random.default_rng(3).random(CHUNKED_INPUT, dtype=np.float32)
    with load_runner(gpu_demo, backend="trt", precision="fp32") as runner:
        chunked = runner.infer(x)
        assert chunked.shape == (5, 1, 120, 100)
        one_by_one = np.concatenate([runner.infer(x[i:i + 1]) for i in range(5)])
        np.testing.assert_allclose(chunked, one_by_one, atol=1e-4)  # each chunk's logits kept (not the last chunk's)
        with pytest.raises(InputError, match="fits no engine profile"):
            runner.infer(np.zeros(OUTSIDE_INPUT, np.float32))


@pytest.mark.gpu(needs="tensorrt")
def test_trt_runner_threads(gpu_demo: Path) -> None:
    import threading

    from attunet_deploy.steps.engines import build_engines

    build_engines(Bundle.load(gpu_demo), ["fp32"])
    x = np.random.default_rng(0).random((1, 1, 128, 128), dtype=np.float32)
    with load_runner(gpu_demo, backend="trt", precision="fp32") as runner:
        expected = runner.infer(x)
        ok: list[bool] = []
        threads = [threading.Thread(target=lambda: ok.extend(np.allclose(runner.infer(x), expected, atol=1e-5)
                                                              for _ in range(20))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(ok) == 80 and all(ok)


@pytest.mark.gpu(needs="ort-gpu")
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_onnxruntime_gpu_providers_verify(gpu_demo: Path, backend: str) -> None:
    rows = verify(Bundle.load(gpu_demo), [backend], ["fp32", "fp16", "int8"])
    ran = [r for r in rows if r["status"] != "unavailable"]
    assert ran, rows
    assert all(r["status"] == "pass" for r in ran), rows


@pytest.fixture(scope="module")
def gpu_demo3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3D demo exported and quantised (FP16 and INT8 graphs) on this machine."""
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    dst = tmp_path_factory.mktemp("gpu3d") / "demo3d"
    export_bundle(ExportSettings(DEMO3D_WEIGHTS, dst))
    quantize_bundle(Bundle.load(dst), QuantizeSettings(verify=False))
    return dst


@pytest.mark.gpu(needs="tensorrt")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_3d_engine_builds_verifies_and_benches(gpu_demo3d: Path, precision: str) -> None:
    """The paper's 3D network as an NCDHW engine (default profile: the roi as optimum, golden windows
    covered), judged on the golden windows, timed at one window and on a whole volume."""
    from attunet_deploy.steps.engines import build_engines, bundle_profile

    bundle = Bundle.load(gpu_demo3d)
    (built,) = build_engines(bundle, [precision]).engines
    assert built["status"] in ("built", "cached")
    if precision != "fp32":
        assert built["layer_precisions"].get(precision, 0) > 0, built["layer_precisions"]
    (row,) = verify(Bundle.load(gpu_demo3d), ["trt"], [precision])
    assert row["status"] == "pass", row
    roi = bundle.sliding_window.roi
    with load_runner(gpu_demo3d, backend="trt", precision=precision) as runner:
        window = bench_runner(runner, BenchSettings(shape=(1, 1, *roi), warmup=5, iterations=50))
        volume = bench_runner(runner, BenchSettings(shape=(1, 1, 96, 192, 192), warmup=1, iterations=3, volume=True))
    assert bundle_profile(bundle).opt == (1, 1, *roi)
    print(f"\ntrt/{precision} 3D: rel_l2 {row['rel_l2']:.2e}, mean Dice {row['mean_dice']:.4f}, window p50 "
          f"{window['latency_ms']['p50']:.3f} ms, volume 96x192x192 {volume['volume_seconds']:.3f} s")


@pytest.mark.gpu(needs="torch-cuda")
def test_torch_cuda_runner_is_an_fp32_reference_for_3d(tmp_path: Path) -> None:
    """The torch runner on CUDA reproduces the CPU reference of the 3D demo within the FP32 tolerance
    (TF32 convolutions turned off: with PyTorch's default they differ by rel L2 1e-4), window by window
    and through the sliding window."""
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.steps.export import ExportSettings, export_bundle

    export_bundle(ExportSettings(DEMO3D_WEIGHTS, tmp_path / "b"))
    bundle = Bundle.load(tmp_path / "b")
    cases = load_golden(bundle)
    with load_runner(bundle, backend="torch", device="cuda") as gpu:
        assert gpu.device.startswith("cuda")
        for case in cases:
            out = gpu.infer(case.inputs)
            rel = float(np.linalg.norm(out - case.logits) / np.linalg.norm(case.logits))
            assert rel <= 1e-5, rel
        volume = np.concatenate([cases[0].inputs[0], cases[0].inputs[1]], axis=1)[None]  # two windows along z
        on_gpu = gpu.infer_volume(volume)
    with load_runner(bundle, backend="torch") as cpu:
        on_cpu = cpu.infer_volume(volume)
    assert float(np.linalg.norm(on_gpu - on_cpu) / np.linalg.norm(on_cpu)) <= 1e-5
