"""Triton model repositories and the `triton` backend, against a real tritonserver.

The server is the `tritonserver` binary inside the nvidia-pytriton wheel (python backend only),
run on 127.0.0.1 from its own venv (pytriton pins numpy < 2, which stays out of the main venv):
.ci/run makes it with `python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton
onnxruntime`; $ATTDEPLOY_TRITON_VENV points elsewhere. Without it the server tests skip with the
reason. Config checks need only tritonclient and always run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient")

from attunet_deploy import load_runner
from attunet_deploy.bundle import Bundle
from attunet_deploy.bundle.spec import ModelSpec
from attunet_deploy.cli import main
from attunet_deploy.errors import InputError
from attunet_deploy.steps import triton_repo as triton_export

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ configs (no server)
def test_every_generated_config_parses_with_tritons_schema(demo_bundle: Path) -> None:
    models = triton_export.plan_repository(Bundle.load(demo_bundle), ["fp32", "fp16", "int8"], kind="gpu",
                                           tensorrt_accelerator=True)
    assert {"attunet_fp32", "attunet_fp16", "attunet_int8", "attunet_cpu", "attunet_pre", "attunet_post",
            "attunet_segment"} <= set(models)
    cfg = triton_export.check_config(models["attunet_int8"]["config"], "attunet_int8")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [1, -1, -1]
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP32"  # precision from the graph
    assert cfg.dynamic_batching is not None and cfg.instance_group[0].kind == 1  # KIND_GPU
    ens = triton_export.check_config(models["attunet_segment"]["config"], "attunet_segment")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["attunet_pre", "attunet_fp32", "attunet_post"]
    pre = triton_export.check_config(models["attunet_pre"]["config"], "attunet_pre")
    assert ModelSpec.from_dict(json.loads(pre.parameters["spec"].string_value)) == Bundle.load(demo_bundle).spec


def test_a_misspelled_field_in_a_template_fails(demo_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_export, "POST_TEMPLATE", triton_export.POST_TEMPLATE.replace("max_batch_size",
                                                                                            "max_batch_sise"))
    with pytest.raises(InputError, match=r"attunet_post.*does not parse"):
        triton_export.plan_repository(Bundle.load(demo_bundle), ["fp32"])


def test_triton_command_refuses_a_foreign_folder_and_validates(demo_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("keep")
    code, _, err = run("triton", "-b", str(demo_bundle), "-o", str(tmp_path / "mine"))
    assert code == 2 and "not a repository written by" in err
    code, _, err = run("triton", "-b", str(demo_bundle), "-o", str(tmp_path / "r"), "--kind", "cpu",
                       "--tensorrt-accelerator")
    assert code == 2 and "--tensorrt-accelerator needs --kind gpu" in err
    code, _, err = run("triton", "-b", str(demo_bundle), "-o", str(tmp_path / "r"), "--kind", "cpu")
    assert code == 0, err
    assert (tmp_path / "r" / "README.md").read_text().count("docker run") == 1
    code, _, err = run("triton", "-b", str(demo_bundle), "-o", str(tmp_path / "r"), "--kind", "cpu")
    assert code == 0, err  # its own repository: rewritten whole


# ------------------------------------------------------------------------------ a real tritonserver
def _triton_venv() -> Path | None:
    env = os.environ.get("ATTDEPLOY_TRITON_VENV")
    venv = Path(env) if env else ROOT / ".venv-triton"
    return venv if (venv / "bin" / "python").exists() else None


@pytest.fixture(scope="module")
def served(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    from tritonharness import serve

    from attunet_deploy.errors import BackendUnavailable

    venv = _triton_venv()
    if venv is None:
        pytest.skip("no Triton venv: python3 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton "
                    "onnxruntime (or set ATTDEPLOY_TRITON_VENV)")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    code, _, err = run("triton", "-b", str(demo_bundle), "-o", str(repo), "--kind", "cpu", "--max-batch", "8")
    assert code == 0, err
    try:
        server = serve(repo, venv)
        live = server.__enter__()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield {"http": live.http, "grpc": live.grpc, "pid": live.pid, "repo": repo}
    finally:
        server.__exit__(None, None, None)
    assert not Path(f"/proc/{live.pid}").exists() or "zombie" in Path(f"/proc/{live.pid}/status").read_text().lower()


def test_served_cpu_model_passes_verify(served: dict, demo_bundle: Path) -> None:
    for url in (served["http"], served["grpc"]):
        code, out, err = run("verify", "-b", str(demo_bundle), "--backend", "triton", "--precision", "fp32",
                             "--triton-url", url, "--triton-model", "attunet_cpu", "--json", "-")
        assert code == 0, err
        (row,) = json.loads(out)["results"]
        assert row["status"] == "pass" and row["rel_l2"] <= 1e-4 and row["device"].startswith("triton")


def test_ensemble_masks_equal_runner_segment(served: dict, demo_bundle: Path) -> None:
    import tritonclient.http as tc

    from attunet_deploy.demo import make_phantoms

    hu, _ = make_phantoms(3, seed=44, size=(100, 130))  # not multiples of 16: pre pads, post crops
    client = tc.InferenceServerClient(served["http"])
    try:
        inp = tc.InferInput("raw", list(hu.shape), "FP32")
        inp.set_data_from_numpy(hu.astype(np.float32))
        masks = client.infer("attunet_segment", [inp]).as_numpy("mask")
    finally:
        client.close()
    with load_runner(demo_bundle, backend="ort") as runner:
        expected = runner.segment(hu)
    assert masks.shape == (3, 100, 130) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, expected)
    assert expected.any()


def test_dynamic_batching_batches_concurrent_requests(served: dict) -> None:
    import tritonclient.http as tc

    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    errors: list[BaseException] = []

    def one() -> None:
        client = tc.InferenceServerClient(served["http"])
        try:
            inp = tc.InferInput("image", [1, 1, 64, 64], "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("attunet_cpu", [inp]).as_numpy("logits").shape == (1, 1, 64, 64)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    client = tc.InferenceServerClient(served["http"])
    try:
        stats = client.get_inference_statistics("attunet_cpu")["model_stats"][0]
    finally:
        client.close()
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]}
    assert any(size > 1 and count > 0 for size, count in sizes.items()), sizes


def test_bench_served_model_with_concurrency(served: dict, demo_bundle: Path) -> None:
    code, out, err = run("bench", "-b", str(demo_bundle), "--backend", "triton", "--triton-url", served["http"],
                         "--triton-model", "attunet_cpu", "--shape", "1x1x64x64", "--concurrency", "4",
                         "--iterations", "5", "--warmup", "1", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["concurrency"] == 4 and row["iterations"] == 20 and row["throughput_ips"] > 0


def test_server_down_wrong_model_and_refused_shape_are_one_line_errors(served: dict, demo_bundle: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    code, _, err = run("verify", "-b", str(demo_bundle), "--backend", "triton", "--precision", "fp32",
                       "--triton-url", dead)
    assert code == 2 and dead in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run("verify", "-b", str(demo_bundle), "--backend", "triton", "--precision", "fp32",
                       "--triton-url", served["http"], "--triton-model", "no_such_model")
    assert code == 2 and "no_such_model" in err and len(err.strip().splitlines()) == 1, err
    with load_runner(demo_bundle, backend="triton", triton_url=served["http"], triton_model="attunet_cpu") as r:
        with pytest.raises(InputError, match=r"attunet_cpu.*refused"):
            r._request(np.zeros((1, 3, 32, 32), np.float32))  # the served model takes 1 channel
