"""Shared fixtures (small popular-layout checkpoints and bundles exported once per session) and the
test lanes.

- ``tests/unit``: numpy only (no torch, no servers), fast: ``pytest -m "not slow"`` runs them alone.
- ``tests/integration``: export, quantize, verify, bench, the CLI, on real bundles (torch).
- ``tests/system``: real servers on 127.0.0.1 (the DICOM node with DCMTK, tritonserver).
- ``tests/gpu``: TensorRT and CUDA, skipped with the reason where they are missing.

Everything outside ``tests/unit`` is marked ``slow``. Without torch only ``tests/unit`` is collected,
so the numpy-only tests run on a device that has no torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "gpu"))  # tests/integration checks test_gpu's shapes on the CPU

#: Lanes beside tests/unit: they export models with torch, run servers or need a GPU.
SLOW_LANES = ("integration", "system", "gpu")
try:
    HAVE_TORCH = importlib.util.find_spec("torch") is not None
except ImportError:  # an import hook that refuses torch (tests/integration/test_without_torch.py)
    HAVE_TORCH = False
if not HAVE_TORCH:
    collect_ignore_glob = [f"{lane}/*" for lane in SLOW_LANES]


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-in / 2-out, base-8 popular-layout checkpoint in a DataParallel wrapper."""
    import torch
    from popular import popular_state_dict, wrap_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "attu_small.pth"
    torch.save(wrap_checkpoint(popular_state_dict(1, 2, 8, head="Conv_1x1", seed=1), "dataparallel"), path)
    return path


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, small_ckpt: Path) -> Path:
    """small_ckpt exported with the default exporter (read-only for tests: copy before changing)."""
    from attunet_deploy.steps.export import ExportSettings, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "small"
    export_bundle(ExportSettings(small_ckpt, out))
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo model exported and quantised (fp16 + int8 on demo phantoms)."""
    from attunet_deploy.bundle import Bundle
    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    out = tmp_path_factory.mktemp("bundles") / "demo"
    export_bundle(ExportSettings(None, out))
    quantize_bundle(Bundle.load(out), QuantizeSettings(verify=False))
    return out


@pytest.fixture(scope="session")
def demo3d_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled 3D demo (oktay3d) exported (read-only for tests: copy before changing)."""
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.steps.export import ExportSettings, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "demo3d"
    export_bundle(ExportSettings(DEMO3D_WEIGHTS, out))
    return out


@pytest.fixture
def bundle_copy(tmp_path: Path, small_bundle: Path) -> Path:
    """A private copy of small_bundle that a test may modify."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(small_bundle, dst)
    return dst


def _torch_cuda() -> bool:
    if not HAVE_TORCH:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from attunet_deploy.environment import cuda_devices, onnxruntime_probe, tensorrt_probe

    trt = tensorrt_probe()
    cuda = cuda_devices()
    ort = onnxruntime_probe()
    ort_gpu = "CUDAExecutionProvider" in ort.extra.get("providers", []) and cuda.available
    for item in items:
        lane = Path(str(item.fspath)).relative_to(HERE).parts[0]
        if lane in SLOW_LANES:
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords:
            needs = item.get_closest_marker("gpu").kwargs.get("needs", "tensorrt")
            if needs == "tensorrt" and not trt.available:
                item.add_marker(pytest.mark.skip(reason=f"needs TensorRT and a CUDA GPU: {trt.detail}"))
            elif needs == "ort-gpu" and not ort_gpu:
                item.add_marker(pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA GPU: "
                                                 f"{cuda.detail if not cuda.available else 'no CUDA provider'}"))
            elif needs == "torch-cuda" and not _torch_cuda():
                item.add_marker(pytest.mark.skip(reason="needs torch with a CUDA GPU (torch.cuda.is_available() "
                                                 "is False or torch is missing)"))


os.environ.setdefault("ATTDEPLOY_TEST", "1")
# auto keeps ONNX Runtime CPU in tests unless a test measures: timings must not decide test outcomes.
os.environ.setdefault("ATTDEPLOY_AUTO_MEASURE", "0")
# INT8 writes the Q/DQ graph only, unless a test asks for NNCF's OpenVINO graph too (about 7 s per quantize:
# tests/integration/test_int8_methods_openvino.py::test_nncf_openvino_int8_graph_is_written_verified_and_run).
os.environ.setdefault("ATTDEPLOY_INT8_TARGET", "onnx")
os.environ.setdefault("ATTDEPLOY_CACHE_DIR", tempfile.mkdtemp(prefix="attdeploy-test-cache-"))
