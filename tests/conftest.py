"""Shared fixtures: small popular-layout checkpoints and bundles exported once per session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

torch = pytest.importorskip("torch")

from popular import popular_state_dict, wrap_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-in / 2-out, base-8 popular-layout checkpoint in a DataParallel wrapper."""
    path = tmp_path_factory.mktemp("ckpt") / "attu_small.pth"
    torch.save(wrap_checkpoint(popular_state_dict(1, 2, 8, head="Conv_1x1", seed=1), "dataparallel"), path)
    return path


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, small_ckpt: Path) -> Path:
    """small_ckpt exported with the default exporter (read-only for tests: copy before changing)."""
    from attunet_deploy.export.onnx import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    export_bundle(small_ckpt, out)
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo model exported and quantised (fp16 + int8 on demo phantoms)."""
    from attunet_deploy.bundle import Bundle
    from attunet_deploy.export.onnx import export_bundle
    from attunet_deploy.export.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("bundles") / "demo"
    export_bundle(None, out)
    quantize_bundle(Bundle.load(out), verify=False)
    return out


@pytest.fixture
def bundle_copy(tmp_path: Path, small_bundle: Path) -> Path:
    """A private copy of small_bundle that a test may modify."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(small_bundle, dst)
    return dst


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from attunet_deploy.environment import cuda_devices, onnxruntime_probe, tensorrt_probe

    trt = tensorrt_probe()
    cuda = cuda_devices()
    ort = onnxruntime_probe()
    ort_gpu = "CUDAExecutionProvider" in ort.extra.get("providers", []) and cuda.available
    for item in items:
        if "gpu" in item.keywords:
            needs = item.get_closest_marker("gpu").kwargs.get("needs", "tensorrt")
            if needs == "tensorrt" and not trt.available:
                item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a CUDA GPU: {trt.detail}"))
            elif needs == "ort-gpu" and not ort_gpu:
                item.add_marker(pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA GPU: "
                                                 f"{cuda.detail if not cuda.available else 'no CUDA provider'}"))


os.environ.setdefault("ATTDEPLOY_TEST", "1")
# auto keeps ONNX Runtime CPU in tests unless a test measures: timings must not decide test outcomes.
os.environ.setdefault("ATTDEPLOY_AUTO_MEASURE", "0")
os.environ.setdefault("ATTDEPLOY_CACHE_DIR", tempfile.mkdtemp(prefix="attdeploy-test-cache-"))
