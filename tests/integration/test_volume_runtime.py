"""3D bundles in the runtime: a bundle holding one of the paper's 3D networks as ONNX ([N, C, D, H, W],
N/D/H/W dynamic, a divisor per axis, the sliding-window block) runs on ONNX Runtime and OpenVINO:
``infer_volume`` equals MONAI's sliding window over the PyTorch network, ``segment_volume``
resamples to the bundle's spacing and back, and all of it works without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attunet_deploy import load_runner  # noqa: E402
from attunet_deploy.bundle import Bundle, open_export_target  # noqa: E402
from attunet_deploy.bundle.spec import InputSpec, ModelSpec, Normalization, Postprocessing, SlidingWindow  # noqa: E402
from attunet_deploy.errors import BundleError, InputError  # noqa: E402
from attunet_deploy.models.oktay3d import Oktay3D, Oktay3DConfig  # noqa: E402

ROI = [32, 32, 32]
WINDOW = {"roi": ROI, "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125, "batch": 2}


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = Oktay3D(Oktay3DConfig(variant="multi_att_dsv", in_channels=1, out_channels=2, feature_scale=16)).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _bundle(root: Path, net: torch.nn.Module, spacing: list[float] | None = None) -> Path:
    _, _, txn = open_export_target(root, False, ["model.onnx"])
    with txn:
        spec = ModelSpec(InputSpec(1, 2, "NCDHW", (16, 16, 16)), Normalization(), Postprocessing("argmax"),
                         SlidingWindow.from_dict(WINDOW), (spacing[0], spacing[1], spacing[2]) if spacing else None)
        txn.manifest = Bundle.new_manifest(config={"in_channels": 1, "out_channels": 2, **net.config.to_dict()},
                                           spec=spec, source={"path": "test"}, family="oktay3d")
        path = txn.stage("model.onnx")
        torch.onnx.export(net, (torch.zeros(1, 1, 32, 32, 32),), str(path), input_names=["image"],
                          output_names=["logits"], dynamo=False, opset_version=18,
                          dynamic_axes={"image": {0: "N", 2: "D", 3: "H", 4: "W"},
                                        "logits": {0: "N", 2: "D", 3: "H", 4: "W"}})
        txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
        txn.commit()
    return root


@pytest.fixture(scope="module")
def volume_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    net = _net()
    return _bundle(tmp_path_factory.mktemp("vol") / "b", net, spacing=[2.0, 1.0, 1.0]), net


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_manifest_of_a_3d_bundle(volume_bundle: tuple[Path, torch.nn.Module]) -> None:
    b = Bundle.load(volume_bundle[0])
    assert (b.family, b.layout, b.spatial_dims, b.divisors) == ("oktay3d", "NCDHW", 3, (16, 16, 16))
    assert b.sliding_window == SlidingWindow.from_dict(WINDOW) and b.spacing == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("backend", ["ort", "ov"])
def test_infer_volume_equals_monai_over_the_torch_network(volume_bundle: tuple[Path, torch.nn.Module],
                                                         backend: str) -> None:
    if backend == "ov":
        pytest.importorskip("openvino")
    from monai.inferers import sliding_window_inference

    root, net = volume_bundle
    x = np.random.default_rng(2).standard_normal((1, 1, 40, 56, 48)).astype(np.float32)
    with torch.inference_mode():
        ref = sliding_window_inference(torch.from_numpy(x), ROI, 2, net, overlap=0.5, mode="gaussian").numpy()
        window = net(torch.from_numpy(x[:, :, :32, :32, :32])).numpy()
    with load_runner(root, backend=backend) as runner:
        assert _rel(runner.infer(x[:, :, :32, :32, :32]), window) <= 1e-4
        assert _rel(runner.infer_volume(x), ref) <= 1e-4
        odd = runner.infer(x[:, :, :20, :33, :17])  # padded up to 32x48x32 and cropped back
        assert odd.shape == (1, 2, 20, 33, 17)
        with pytest.raises(InputError, match=r"\[N, C, D, H, W\]"):
            runner.infer(x[0])


def test_segment_volume_resamples_to_the_bundle_spacing_and_back(volume_bundle: tuple[Path, torch.nn.Module]) -> None:
    root, _ = volume_bundle
    raw = np.random.default_rng(3).standard_normal((24, 40, 36)).astype(np.float32)
    with load_runner(root, backend="ort") as runner:
        plain = runner.segment_volume(raw)
        resampled = runner.segment_volume(raw, spacing=(1.0, 1.0, 1.0))  # 24 slices at 1 mm -> 12 at 2 mm
        assert plain.shape == resampled.shape == raw.shape and plain.dtype == np.uint8
        assert set(np.unique(plain)) <= {0, 1}
        with pytest.raises(InputError, match="spacing"):
            runner.segment_volume(raw, spacing=(0.0, 1.0, 1.0))
        with pytest.raises(InputError, match="one volume"):
            runner.segment_volume(raw[0])
    assert not np.array_equal(plain, resampled) or plain.sum() in (0, plain.size)


def test_segment_volume_without_torch(volume_bundle: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    from test_without_torch import BLOCK_TORCH

    root, _ = volume_bundle
    out = tmp_path / "r.json"
    code = BLOCK_TORCH + f"""
import json, numpy as np
from attunet_deploy import load_runner
raw = np.random.default_rng(4).standard_normal((20, 36, 30)).astype(np.float32)
res = {{}}
for backend in ("ort", "ov"):
    try:
        with load_runner({str(root)!r}, backend=backend) as r:
            res[backend] = r.segment_volume(raw, spacing=(1.5, 1.0, 1.0)).tolist()
    except Exception as exc:
        res[backend] = type(exc).__name__ + ": " + str(exc)
res["torch"] = "torch" in sys.modules
json.dump(res, open({str(out)!r}, "w"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["torch"] is False
    assert np.asarray(res["ort"]).shape == (20, 36, 30)
    if not isinstance(res["ov"], str):
        assert (np.asarray(res["ov"]) == np.asarray(res["ort"])).mean() > 0.99


def test_3d_manifests_are_validated(volume_bundle: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    import shutil

    for edit, match in [(lambda m: m["inference"]["sliding_window"].update(roi=[32, 30, 32]), "multiple"),
                        (lambda m: m.pop("inference"), "sliding_window"),
                        (lambda m: m["inference"]["sliding_window"].update(mode="median"), "mode"),
                        (lambda m: m["input"].update(spatial_divisor=[16, 16]), "spatial_divisor"),
                        (lambda m: m["preprocessing"].update(spacing=[1.0, -1.0, 1.0]), "spacing"),
                        (lambda m: m["model"].update(family="unet"), "family")]:
        dst = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(volume_bundle[0], dst)
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=match):
            Bundle.load(dst)


def test_2d_bundles_read_as_before(small_bundle: Path) -> None:
    b = Bundle.load(small_bundle)
    assert (b.family, b.layout, b.spatial_dims, b.divisors, b.divisor) == ("attunet2d", "NCHW", 2, (16, 16), 16)
    assert b.sliding_window is None and b.spacing is None
    with load_runner(b, backend="ort") as runner, pytest.raises(InputError, match="3D bundle"):
        runner.infer_volume(np.zeros((1, 1, 16, 16, 16), np.float32))
