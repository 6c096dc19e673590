"""A 3D bundle in Triton, on the real tritonserver of the nvidia-pytriton wheel (python backend, CPU):
5-D configs that parse with Triton's schema, ``attunet_cpu`` judged by ``verify --backend triton`` on
the golden windows, ``attunet_volume`` (BLS: raw volume and spacing in, mask out) equal to the
in-process ``segment_volume`` on two phantom volumes, and ``bench --backend triton --concurrency``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient")
pytest.importorskip("torch")

from test_triton_repository import _triton_venv

from attunet_deploy import load_runner
from attunet_deploy.cli import main
from attunet_deploy.demo.phantom3d import make_volume


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def bundle3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.steps.export import ExportSettings, export_bundle

    out = tmp_path_factory.mktemp("t3d") / "bundle"
    export_bundle(ExportSettings(DEMO3D_WEIGHTS, out))
    return out


@pytest.fixture(scope="module")
def served3d(bundle3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    from tritonharness import serve

    from attunet_deploy.errors import BackendUnavailable

    repo = tmp_path_factory.mktemp("triton3d") / "repo"
    code, _, err = run("triton", "-b", str(bundle3d), "-o", str(repo), "--kind", "cpu")
    assert code == 0, err
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {"attunet_fp32", "attunet_cpu", "attunet_volume"}
    assert "dims: [ 1, -1, -1, -1 ]" in configs["attunet_cpu"] and "attunet_segment" not in configs
    venv = _triton_venv()
    if venv is None:
        pytest.skip("no Triton venv: python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton "
                    "onnxruntime (or set ATTDEPLOY_TRITON_VENV)")
    try:
        server = serve(repo, venv, models=("attunet_cpu", "attunet_volume"))
        live = server.__enter__()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield {"http": live.http, "grpc": live.grpc, "pid": live.pid}
    finally:
        server.__exit__(None, None, None)
    assert not Path(f"/proc/{live.pid}").exists() or "zombie" in Path(f"/proc/{live.pid}/status").read_text().lower()


def test_served_volume_masks_equal_in_process_segment_volume(served3d: dict, bundle3d: Path) -> None:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(served3d["http"], network_timeout=300)
    try:
        with load_runner(bundle3d, backend="ort") as runner:
            for seed, size, spacing in ((11, (30, 70, 66), (4.0, 4.5, 4.5)), (12, (24, 64, 64), None)):
                hu, _ = make_volume(seed, size)
                inputs = [tc.InferInput("volume", list(hu.shape), "FP32")]
                inputs[0].set_data_from_numpy(hu)
                if spacing is not None:
                    inputs.append(tc.InferInput("spacing", [3], "FP32"))
                    inputs[1].set_data_from_numpy(np.asarray(spacing, np.float32))
                mask = client.infer("attunet_volume", inputs).as_numpy("mask")
                expected = runner.segment_volume(hu, spacing=spacing)
                assert mask.dtype == np.uint8 and mask.shape == hu.shape
                np.testing.assert_array_equal(mask, expected)
                assert expected.any()
        bad = tc.InferInput("volume", [4, 8, 8], "FP32")
        bad.set_data_from_numpy(np.full((4, 8, 8), np.nan, np.float32))
        with pytest.raises(Exception, match="NaN"):
            client.infer("attunet_volume", [bad])
    finally:
        client.close()


def test_served_3d_windows_pass_verify_and_bench(served3d: dict, bundle3d: Path) -> None:
    code, out, err = run("verify", "-b", str(bundle3d), "--backend", "triton", "--precision", "fp32",
                         "--triton-url", served3d["http"], "--triton-model", "attunet_cpu", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["status"] == "pass" and row["rel_l2"] <= 1e-4
    code, out, err = run("bench", "-b", str(bundle3d), "--backend", "triton", "--triton-url", served3d["http"],
                         "--triton-model", "attunet_cpu", "--shape", "1x1x32x48x48", "--concurrency", "2",
                         "--iterations", "3", "--warmup", "1", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["concurrency"] == 2 and row["shape"] == [1, 1, 32, 48, 48] and row["throughput_ips"] > 0


def test_gpu_repository_sends_windows_to_the_onnx_model(bundle3d: Path) -> None:
    from attunet_deploy.bundle import Bundle
    from attunet_deploy.steps.triton_repo import plan_repository

    models = plan_repository(Bundle.load(bundle3d), ["fp32"], kind="gpu")  # every config parsed with Triton's schema
    assert set(models) == {"attunet_fp32", "attunet_cpu", "attunet_volume"}
    assert 'string_value: "attunet_fp32"' in models["attunet_volume"]["config"]
    assert "dims: [ 1, -1, -1, -1 ]" in models["attunet_fp32"]["config"]
