"""INT8 calibration methods that differ, accuracy-aware INT8, the OpenVINO backend, and
`auto` choosing OpenVINO only where it was measured faster. Timing targets live in benchmarks/."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attunet_deploy.build.int8 import calibrate, first_block_inputs, kl_threshold, quantize_int8
from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main
from attunet_deploy.demo import DEMO_WEIGHTS, make_phantoms
from attunet_deploy.io.golden import load_golden
from attunet_deploy.segmenter import Segmenter


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def _thresholds(ranges: object) -> dict[str, float]:
    return {k: float(np.max(np.abs(np.asarray(v.range_value, dtype=np.float64)))) for k, v in ranges.items()}


def test_kl_threshold_clips_far_outliers_but_keeps_the_bulk() -> None:
    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.standard_normal(200_000), [40.0, 55.0, 60.0]]))
    hist, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    t = kl_threshold(hist, edges)
    assert 2.5 < t < 20.0  # well above the bulk (|N(0,1)| 99.7 % < 3), far below the outliers


def test_calibration_methods_give_different_sensible_ranges(demo_bundle: Path, tmp_path: Path) -> None:
    b = Bundle.load(demo_bundle)
    hu, _ = make_phantoms(8, seed=5)
    x = Segmenter(b.spec).normalize(hu)
    inputs = [x[i:i + 1] for i in range(len(x))]
    src = b.onnx_path("fp32")
    ranges = {m: calibrate(src, inputs, m) for m in ("minmax", "percentile", "entropy")}
    t = {m: _thresholds(r) for m, r in ranges.items()}
    assert set(t["minmax"]) == set(t["percentile"]) == set(t["entropy"])
    first = first_block_inputs(src)
    assert first and all(abs(t["entropy"][n] - t["minmax"][n]) <= 0.01 * t["minmax"][n] for n in first)
    for name in t["minmax"]:
        # (a histogram threshold is a bin edge: it may pass the maximum by a fraction of a bin)
        assert 0 < t["entropy"][name] <= t["minmax"][name] * 1.01, name
        assert 0 < t["percentile"][name] <= t["minmax"][name] * 1.01, name
    differ = sum(abs(t["entropy"][n] - t["minmax"][n]) > 1e-3 * t["minmax"][n] for n in t["minmax"])
    assert differ >= len(t["minmax"]) // 2  # entropy really clips (it used to equal minmax)
    shas = set()
    cases = load_golden(b)
    from attunet_deploy.steps.quantize import evaluate_int8

    for m in ("minmax", "percentile", "entropy"):
        out = tmp_path / f"{m}.onnx"
        quantize_int8(src, out, inputs, method=m, ranges=ranges[m])  # calibrated once per method, above
        shas.add(hashlib.sha256(out.read_bytes()).hexdigest())
        dice, _ = evaluate_int8(out, cases, Segmenter(b.spec))
        assert dice >= 0.98, (m, dice)  # entropy too: the first block keeps its min/max ranges
    assert len(shas) == 3


def _outlier_checkpoint(path: Path) -> None:
    """The demo model with one enc3 activation channel 1000x larger (compensated in the next conv):
    the same function in float, but per-tensor INT8 of that activation loses the other channels."""
    ck = torch.load(DEMO_WEIGHTS, weights_only=True)
    sd = ck["state_dict"]
    for name in ("enc3.conv.1.weight", "enc3.conv.1.bias"):
        sd[name][3] *= 1000.0
    sd["enc3.conv.3.weight"][:, 3] /= 1000.0
    torch.save(ck, path)


def test_accuracy_aware_int8_returns_the_sensitive_convolutions_to_float(tmp_path: Path) -> None:
    import onnx

    _outlier_checkpoint(tmp_path / "outlier.pt")
    images = tmp_path / "phantoms"
    images.mkdir()
    hu, _ = make_phantoms(20, seed=9)
    for i in range(len(hu)):
        np.save(images / f"p{i:02d}.npy", hu[i, 0])
    b = tmp_path / "b"
    code, _, err = run("export", str(tmp_path / "outlier.pt"), "-o", str(b), "--images", str(images),
                       "--normalize", "ct-window:40,400", "--check-rel-l2", "1e-4", "--exporter", "torchscript")
    assert code == 0, err
    code, _, err = run("quantize", "-b", str(b), "--precision", "int8")
    assert code == 1 and "mean Dice" in err  # default INT8 misses the target; nothing written
    assert "model.int8.onnx" not in Bundle.load(b).artifacts
    code, out, err = run("quantize", "-b", str(b), "--precision", "int8", "--max-dice-drop", "0.02")
    assert code == 0, err
    assert "Accuracy-aware INT8" in out
    aa = Bundle.load(b).manifest["artifacts"]["model.int8.onnx"]["producer"]["accuracy_aware"]
    assert aa["steps"][0]["mean_dice"] < 0.98 <= aa["steps"][-1]["mean_dice"]
    assert all("latency_ms" in st and st["latency_ms"] > 0 for st in aa["steps"])
    graph = onnx.load(str(b / "model.int8.onnx")).graph
    assert set(aa["reverted"]) <= {n.name for n in graph.node if n.op_type == "Conv"}
    assert {"/enc3/conv/conv.0/Conv", "/enc3/conv/conv.3/Conv"} <= set(aa["reverted"])  # both ends of the outlier
    assert len(aa["reverted"]) <= 4  # the ranking finds them; not half the network
    int8 = Bundle.load(b).manifest["artifacts"]["model.int8.onnx"]
    assert set(aa["reverted"]) <= set(int8["producer"]["float_nodes"])


@pytest.fixture
def need_openvino() -> None:
    pytest.importorskip("openvino")


def test_openvino_verifies_every_precision_on_the_demo(need_openvino: None, demo_bundle: Path) -> None:
    code, out, err = run("verify", "-b", str(demo_bundle), "--backend", "ov", "--json", "-")
    assert code == 0, err
    rows = {r["precision"]: r for r in json.loads(out)["results"]}
    assert rows["fp32"]["status"] == "pass" and rows["fp32"]["rel_l2"] <= 1e-4
    assert rows["fp16"]["status"] == "pass" and rows["int8"]["status"] == "pass"
    assert rows["int8"]["mean_dice"] >= 0.98


def test_openvino_precision_is_pinned(need_openvino: None) -> None:
    from attunet_deploy.runtimes.openvino import precision_plan

    assert precision_plan("fp32", ["avx512_bf16", "amx_bf16"]) == ("model.onnx", "f32")  # never bf16 for fp32
    # the fp16 row without a measurement: bf16 on AMX, f16 on AVX-512 FP16 without AMX, else f32
    assert precision_plan("fp16", ["avx512_fp16", "avx512_bf16", "amx_bf16"]) == ("model.onnx", "bf16")
    assert precision_plan("fp16", ["avx512_fp16"]) == ("model.fp16.onnx", "f16")
    assert precision_plan("fp16", ["avx512_bf16"]) == ("model.fp16.onnx", "f32")
    assert precision_plan("fp16", ["avx2"]) == ("model.fp16.onnx", "f32")
    assert precision_plan("int8", ["avx2"]) == ("model.int8.onnx", "f32")


def test_openvino_16bit_mode_is_measured_once_and_said(need_openvino: None, demo_bundle: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp16 row runs the fastest exact-enough 16-bit mode measured on this CPU, cached per machine."""
    from attunet_deploy import load_runner
    from attunet_deploy.environment import machine_info
    from attunet_deploy.runtimes import ov_precision

    monkeypatch.setenv("ATTDEPLOY_AUTO_MEASURE", "1")
    monkeypatch.setenv("ATTDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    options = dict(ov_precision.candidates(machine_info()["isa"]))
    with load_runner(demo_bundle, backend="ov", precision="fp16") as runner:
        extras = runner.bench_extras()
        device = runner.device
    if len(options) == 1:  # a CPU without native 16-bit math: the FP16 graph in f32, nothing to measure
        assert extras["openvino_precision_hint"] == "f32"
        return
    choice = extras["openvino_16bit_choice"]
    assert choice["chosen_by"] == "measured on this machine" and set(choice["p50_ms"]) == set(options)
    hint = choice["hint"]
    assert choice["rel_l2_vs_fp32"][hint] <= ov_precision.EXACT_ENOUGH_REL_L2
    exact = [h for h, r in choice["rel_l2_vs_fp32"].items() if r <= ov_precision.EXACT_ENOUGH_REL_L2]
    assert choice["p50_ms"][hint] == min(choice["p50_ms"][h] for h in exact)
    assert extras["openvino_precision_hint"] == hint and extras["openvino_graph"] == options[hint]
    assert device == ("cpu" if hint == "f32" else f"cpu ({hint})")

    def no_measuring(*_args: object) -> None:
        raise AssertionError("measured twice")

    monkeypatch.setattr(ov_precision, "measure", no_measuring)
    with load_runner(demo_bundle, backend="ov", precision="fp16") as again:
        assert again.bench_extras()["openvino_16bit_choice"]["hint"] == hint  # from the cache


def test_openvino_threads_and_cache(need_openvino: None, demo_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from attunet_deploy import load_runner

    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    x = np.random.default_rng(0).random((2, 1, 70, 90), dtype=np.float32)
    with load_runner(b, backend="ov", precision="fp32", threads=1, self_check=False) as r:
        assert r._compiled is None  # compiled on first use (a stream needs only throughput models)
        y = r.infer(x)
        assert r._compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert y.shape == (2, 1, 70, 90)
    assert list((b / "engines" / "openvino").iterdir())  # compiled-model cache in the bundle
    with load_runner(b, backend="ort") as r:
        np.testing.assert_allclose(y, r.infer(x), atol=1e-3)


def test_auto_prefers_openvino_only_where_measured_faster(need_openvino: None, demo_bundle: Path,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from attunet_deploy.runtimes import select

    monkeypatch.setenv("ATTDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTDEPLOY_AUTO_MEASURE", "1")
    calls: list[tuple[str, ...]] = []
    timings = {"ov": 0.010, "ort": 0.020}

    def fake_measure(bundle: Bundle, precision: str, backends: tuple[str, ...]) -> dict[str, float]:
        calls.append(backends)
        return {b: timings[b] for b in backends}

    monkeypatch.setattr(select, "measure", fake_measure)
    b = Bundle.load(demo_bundle)
    assert select.resolve_auto(b, "int8") == "ov"
    assert select.resolve_auto(b, "int8") == "ov" and len(calls) == 1  # measured once, then cached on disk
    assert json.loads((tmp_path / "cache" / "auto-backend.json").read_text())
    timings.update(ov=0.030)
    assert select.resolve_auto(b, "fp32") == "ort"  # fp32: its own measurement, ov slower there
    monkeypatch.setenv("ATTDEPLOY_AUTO_MEASURE", "0")
    monkeypatch.setenv("ATTDEPLOY_CACHE_DIR", str(tmp_path / "empty"))
    assert select.resolve_auto(b, "int8") == "ort"  # nothing measured, measuring off: keep ONNX Runtime


def test_bench_json_names_the_machine(demo_bundle: Path) -> None:
    code, out, err = run("bench", "-b", str(demo_bundle), "--backend", "ort", "--precision", "int8", "--shape",
                         "1x1x64x64", "--iterations", "2", "--warmup", "0", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    m = row["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and isinstance(m["isa"], list)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("avx2" in m["isa"]) == (" avx2" in flags)


def test_nncf_openvino_int8_graph_is_written_verified_and_run(need_openvino: None, demo_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize also writes NNCF's OpenVINO-native INT8 graph (same calibration set), verified on OpenVINO;
    ov/int8 runs it and says so; a Q/DQ-only requantisation drops the stale one."""
    import shutil

    pytest.importorskip("nncf")
    from attunet_deploy import load_runner
    from attunet_deploy.bundle import OV_INT8_BIN, OV_INT8_XML

    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    # --target openvino overrides the environment's onnx (conftest); --max-dice-drop runs NNCF's accuracy control
    code, _, err = run("quantize", "-b", str(b), "--precision", "int8", "--max-samples", "16", "--target", "openvino",
                       "--max-dice-drop", "0.01")
    assert code == 0, err
    bundle = Bundle.load(b)
    producer = bundle.manifest["artifacts"][OV_INT8_XML]["producer"]
    control = producer["accuracy_control"]
    assert control["max_drop"] == 0.01 and control["mean_dice"] >= 0.99 and control["images"] >= 8
    assert producer["quantizer"] == "nncf" and producer["nncf"] and producer["preset"] == "default"
    qdq = bundle.manifest["artifacts"]["model.int8.onnx"]["producer"]
    assert producer["calibration_files"] == qdq["calibration_files"]
    assert set(producer["ignored_scope"]) <= set(qdq["float_nodes"])
    assert producer["ignored_scope"]  # the gates' psi convs and the head stay in float here too
    # the four decoder up-convolutions (nearest x2 + 3x3) were quantised as transposed convolutions
    rewritten = producer["rewrites"]["upsample_conv_to_conv_transpose"]
    assert len(rewritten) == 4 and not set(rewritten) & set(producer["ignored_scope"])
    xml = (b / OV_INT8_XML).read_text()
    assert xml.count('type="ConvolutionBackpropData"') == 4 and 'type="Interpolate"' not in xml
    assert bundle.manifest["artifacts"][OV_INT8_BIN]["kind"] == "openvino-weights"
    code, out, err = run("verify", "-b", str(b), "--backend", "ov", "--precision", "int8", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["status"] == "pass" and row["device"] == "cpu (NNCF IR)" and row["mean_dice"] >= 0.99
    with load_runner(b, backend="ov", precision="int8", qdq_graph=True) as qdq:
        assert qdq.bench_extras()["openvino_graph"] == "model.int8.onnx"
    # issue 34: a listed NNCF graph whose weights went missing is an error, not a silent run of the Q/DQ graph
    gone = tmp_path / "gone"
    shutil.copytree(b, gone, ignore=shutil.ignore_patterns(OV_INT8_BIN, "engines"))
    from attunet_deploy.errors import BundleError

    with pytest.raises(BundleError, match=f"{OV_INT8_BIN} is listed in the manifest but missing"):
        load_runner(gone, backend="ov", precision="int8").activate()
    monkeypatch.setenv("ATTDEPLOY_INT8_TARGET", "all")
    code, _, err = run("quantize", "-b", str(b), "--precision", "int8", "--max-samples", "4", "--no-verify",
                       "--target", "onnx")
    assert code == 0, err
    assert OV_INT8_XML not in Bundle.load(b).artifacts and not (b / OV_INT8_XML).exists()
    code, _, err = run("quantize", "-b", str(b), "--target", "tensorrt")
    assert code == 2 and "--target" in err


def test_openvino_infer_many_keeps_order_and_matches_infer(need_openvino: None, demo_bundle: Path) -> None:
    """Throughput streams (several requests in flight, a model per run of same-shape inputs) give
    the same logits as one-by-one infer, in input order, across shape changes."""
    from attunet_deploy import load_runner

    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, 1, h, w)).astype(np.float32)
          for h, w in [(64, 64)] * 5 + [(80, 48)] * 3 + [(64, 64)] * 2 + [(50, 70)]]
    with load_runner(demo_bundle, backend="ov", precision="fp32") as runner:
        streamed = list(runner.infer_many(iter(xs)))
        one_by_one = [runner.infer(x) for x in xs]
    assert [y.shape for y in streamed] == [(1, 1, *x.shape[2:]) for x in xs]
    for a, b in zip(streamed, one_by_one):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


def test_openvino_infer_many_survives_a_failing_input_stream(need_openvino: None, demo_bundle: Path) -> None:
    """An input stream that raises mid-way (predict reading a bad file) surfaces its own error after
    the requests in flight have finished, and the runner streams again afterwards."""
    from attunet_deploy import load_runner
    from attunet_deploy.errors import InputError

    x = np.random.default_rng(5).standard_normal((1, 1, 64, 64)).astype(np.float32)

    def stream() -> Any:
        yield from [x] * 5
        raise InputError("bad file")

    with load_runner(demo_bundle, backend="ov", precision="fp32") as runner:
        got = []
        with pytest.raises(InputError, match="bad file"):
            for y in runner.infer_many(stream()):
                got.append(y)
        assert len(got) <= 5
        again = list(runner.infer_many([x, x]))
        assert np.abs(again[0] - runner.infer(x)).max() <= 1e-4 * max(1.0, float(np.abs(again[0]).max()))
