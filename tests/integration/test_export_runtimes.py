"""ONNX export with dynamic N/H/W, the golden set, and the torch / ONNX Runtime runners."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from popular import popular_forward, popular_state_dict, wrap_checkpoint

from attunet_deploy import load_runner
from attunet_deploy.build.trt_lint import lint_onnx
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.metrics import rel_l2
from attunet_deploy.steps.export import ExportSettings, export_bundle


def test_bundle_layout_and_manifest(small_bundle: Path) -> None:
    m = json.loads((small_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert m["model"]["config"] == {"in_channels": 1, "out_channels": 2, "base_channels": 8}
    assert m["input"]["spatial_divisor"] == 16 and m["input"]["layout"] == "NCHW"
    assert m["postprocessing"] == {"kind": "argmax"}
    assert set(m["artifacts"]) == {"weights.pt", "model.onnx", "golden.npz", "selfcheck.npz"}
    for name, entry in m["artifacts"].items():
        assert len(entry["sha256"]) == 64 and entry["bytes"] == (small_bundle / name).stat().st_size
    assert m["artifacts"]["model.onnx"]["producer"]["opset"] == 18
    assert "torch" in m["artifacts"]["model.onnx"]["producer"]
    assert m["verification"]["ort/fp32"]["status"] == "pass"
    assert m["artifacts"]["model.onnx"]["trt_lint"] == []  # export lints its graph for TensorRT
    assert not list(small_bundle.glob("*.data"))  # self-contained: no external-data side file


def test_onnx_graph_is_dynamic_and_checked(small_bundle: Path) -> None:
    model = onnx.load(str(small_bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "logits"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 1, "H", "W"]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 2, "H", "W"]
    assert lint_onnx(small_bundle / "model.onnx") == []


def test_golden_set_has_three_shapes_including_non_divisible(small_bundle: Path) -> None:
    with np.load(small_bundle / "golden.npz") as g:
        shapes = [g[f"case{i}_input"].shape for i in range(3)]
    assert {s[0] for s in shapes} == {1, 2}
    assert any(s[2] % 16 or s[3] % 16 for s in shapes)


def test_ort_reproduces_popular_model_on_onnx_dynamic_shapes(small_ckpt: Path, small_bundle: Path) -> None:
    sd = torch.load(small_ckpt, weights_only=True)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sess = ort.InferenceSession(str(small_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 256, 256), (2, 1, 320, 192), (1, 1, 96, 160), (3, 1, 16, 48)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = popular_forward(sd, x).numpy()
        out = sess.run(None, {"image": x.numpy()})[0]
        assert out.shape == ref.shape
        assert rel_l2(out, ref) <= 1e-5, shape


@pytest.mark.slow
@pytest.mark.parametrize("head", ["Conv"])
def test_full_size_popular_checkpoint_exports_exactly(tmp_path: Path, head: str) -> None:
    """Acceptance: in 3 / out 1 / base 64 (bigmb naming), ORT vs the original model <= 1e-5."""
    sd = popular_state_dict(3, 1, 64, head=head, seed=7)
    torch.save(wrap_checkpoint(sd, "bare"), tmp_path / "full.pth")
    export_bundle(ExportSettings(tmp_path / "full.pth", tmp_path / "b"))
    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 240, 176)]:  # a batch, and sizes that are multiples of 16 but not of 32
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = popular_forward(sd, x, head=head).numpy()
        assert rel_l2(sess.run(None, {"image": x.numpy()})[0], ref) <= 1e-5, shape


def test_ort_runner_matches_torch_runner_at_any_size(small_bundle: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 1, 250, 300)).astype(np.float32)
    with load_runner(small_bundle, backend="ort") as ort_runner, load_runner(small_bundle, backend="torch") as ref:
        y = ort_runner.infer(x)
        y_ref = ref.infer(x)
        masks = ort_runner.segment(x)
    assert y.shape == (2, 2, 250, 300) and y.dtype == np.float32
    assert rel_l2(y, y_ref) <= 1e-5
    assert masks.shape == (2, 250, 300) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}


def test_runner_accepts_common_dtypes_and_2d_segment(small_bundle: Path) -> None:
    runner = load_runner(small_bundle, backend="ort")
    x64 = np.random.default_rng(1).standard_normal((1, 1, 33, 17))
    assert np.allclose(runner.infer(x64), runner.infer(x64.astype(np.float32)))
    assert runner.infer((x64 > 0).astype(np.uint8)).shape == (1, 2, 33, 17)
    assert runner.segment(x64[0, 0]).shape == (1, 33, 17)  # [H, W] for one channel
    assert runner.segment(np.repeat(x64[:, 0], 3, axis=0)).shape == (3, 33, 17)  # [N, H, W] slices, one channel
    runner.deactivate()


@pytest.mark.parametrize(("bad", "match"), [
    (np.zeros((1, 3, 32, 32), np.float32), "3 channels, the model takes 1"),
    (np.zeros((0, 1, 32, 32), np.float32), "empty batch"),
    (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN/Inf"),
    (np.zeros((1, 32, 32), np.float32), r"one-channel slices \[N, H, W\]: x\[:, None\]"),
    (np.array([["a"]]), "numeric"),
    (np.zeros((1, 1, 0, 32), np.float32), "empty spatial"),
])
def test_runner_rejects_bad_input(small_bundle: Path, bad: np.ndarray, match: str) -> None:
    runner = load_runner(small_bundle, backend="ort")
    with pytest.raises(ValueError, match=match):
        runner.infer(bad)


def test_threads_share_one_runner(small_bundle: Path) -> None:
    """8 threads x 50 infer calls on one runner equal the sequential results."""
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1, 1, 32 + 8 * (i % 3), 48)).astype(np.float32) for i in range(8)]
    with load_runner(small_bundle, backend="ort") as runner:
        expected = [runner.infer(x) for x in inputs]
        mismatches: list[int] = []
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for _ in range(50):
                    if not np.array_equal(runner.infer(inputs[i]), expected[i]):
                        mismatches.append(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and not mismatches


def test_torch_runner_threads(small_bundle: Path) -> None:
    x = np.random.default_rng(3).standard_normal((1, 1, 48, 48)).astype(np.float32)
    with load_runner(small_bundle, backend="torch") as runner:
        expected = runner.infer(x)
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.extend(
            np.allclose(runner.infer(x), expected, atol=1e-6) for _ in range(10))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 40 and all(results)


def test_load_runner_errors(small_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown backend"):
        load_runner(small_bundle, backend="tflite")
    with pytest.raises(BackendUnavailable, match=r"no model\.int8\.onnx"):
        load_runner(small_bundle, backend="ort", precision="int8")
    with pytest.raises(BackendUnavailable, match=r"torch runs fp32|does not run fp16"):
        load_runner(small_bundle, backend="torch", precision="fp16").activate()
    with pytest.raises(InputError, match="no bundle"):
        load_runner(tmp_path / "missing")


def test_auto_backend_is_cpu_onnxruntime_here(small_bundle: Path) -> None:
    runner = load_runner(small_bundle, backend="auto")
    assert runner.backend in ("ort", "ort-cuda", "trt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert runner.backend == "ort"


def test_bundle_detects_truncated_and_swapped_artifacts(bundle_copy: Path) -> None:
    onnx_path = bundle_copy / "model.onnx"
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or replaced"):
        Bundle.load(bundle_copy)
    onnx_path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InputError, match="sha256"):
        Bundle.load(bundle_copy)
    onnx_path.write_bytes(data)
    Bundle.load(bundle_copy)


def test_bundle_schema_version_checked(bundle_copy: Path) -> None:
    mpath = bundle_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(InputError, match="schema version 99"):
        Bundle.load(bundle_copy)
