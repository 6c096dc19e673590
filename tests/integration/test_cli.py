"""The CLI's error policy, atomic writes and the commands' happy paths on a small bundle."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from popular import popular_state_dict

from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    return result.exit_code, result.stdout, result.stderr


def assert_clean_error(code: int, stderr: str, match: str) -> None:
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, stderr
    assert "Traceback" not in stderr
    assert match in stderr, stderr


# ---------------------------------------------------------------------------- bad input, exit 2
def test_missing_checkpoint(tmp_path: Path) -> None:
    code, _, err = run("export", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "b"))
    assert_clean_error(code, err, "checkpoint not found")
    assert not (tmp_path / "b").exists()


def test_random_bytes_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(np.random.default_rng(44).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    code, _, err = run("export", str(tmp_path / "junk.pth"), "-o", str(tmp_path / "b"))
    assert_clean_error(code, err, "cannot read")


def test_other_network_state_dict(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "lin.pth")
    code, _, err = run("export", str(tmp_path / "lin.pth"), "-o", str(tmp_path / "b"))
    assert_clean_error(code, err, "does not match the Attention U-Net")
    assert "missing" in err and "unexpected (weight, bias)" in err


def test_pickled_module_needs_flag(tmp_path: Path) -> None:
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), tmp_path / "full.pt")
    code, _, err = run("export", str(tmp_path / "full.pt"), "-o", str(tmp_path / "b"))
    assert_clean_error(code, err, "--trust-pickle")


def test_export_refuses_foreign_directory_and_leaves_it(tmp_path: Path, small_ckpt: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run("export", str(small_ckpt), "-o", str(out))
    assert_clean_error(code, err, "not a bundle")
    assert "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_verify_missing_bundle(tmp_path: Path) -> None:
    code, _, err = run("verify", "-b", str(tmp_path / "none"))
    assert_clean_error(code, err, "no bundle at")


def test_verify_truncated_onnx(bundle_copy: Path) -> None:
    p = bundle_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    code, _, err = run("verify", "-b", str(bundle_copy))
    assert_clean_error(code, err, "truncated or replaced")


def test_bench_wrong_channels(small_bundle: Path) -> None:
    code, _, err = run("bench", "-b", str(small_bundle), "--backend", "ort", "--shape", "1x3x64x64")
    assert_clean_error(code, err, "model takes 1")


def test_bench_unparseable_shape(small_bundle: Path) -> None:
    code, _, err = run("bench", "-b", str(small_bundle), "--backend", "ort", "--shape", "big")
    assert_clean_error(code, err, "bad shape")


def test_predict_nan_image(small_bundle: Path, tmp_path: Path) -> None:
    img = np.zeros((1, 1, 40, 40), np.float32)
    img[0, 0, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", img)
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "nan.npy"), "-o", str(tmp_path / "out"))
    assert_clean_error(code, err, "NaN")
    assert not (tmp_path / "out").exists()


def test_quantize_empty_calibration_dir(bundle_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run("quantize", "-b", str(bundle_copy), "--calib", str(tmp_path / "empty"))
    assert_clean_error(code, err, "no images in")
    assert "model.int8.onnx" not in Bundle.load(bundle_copy).artifacts


def test_quantize_user_model_without_calib(bundle_copy: Path) -> None:
    code, _, err = run("quantize", "-b", str(bundle_copy))
    assert_clean_error(code, err, "--calib")


def test_build_without_tensorrt(small_bundle: Path) -> None:
    from attunet_deploy.environment import tensorrt_probe

    if tensorrt_probe().available:
        pytest.skip("TensorRT and a GPU are present")
    code, _, err = run("build", "-b", str(small_bundle), "--precision", "fp16")
    assert_clean_error(code, err, "TensorRT")
    code, _, err = run("verify", "-b", str(small_bundle), "--backend", "trt")
    assert_clean_error(code, err, "no requested backend can run here")
    code, _, err = run("bench", "-b", str(small_bundle), "--backend", "trt")
    assert_clean_error(code, err, "nothing could be timed")


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--debug", "verify", "-b", str(tmp_path / "none")])
    assert result.exit_code != 0 and result.exception is not None  # re-raised, not swallowed


# ---------------------------------------------------------------------------- happy paths
def test_verify_json_and_exit_codes(bundle_copy: Path, tmp_path: Path) -> None:
    code, out, err = run("verify", "-b", str(bundle_copy), "--backend", "all", "--json", str(tmp_path / "v.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "v.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in data["results"]}
    assert rows[("torch", "fp32")]["status"] == "pass" and rows[("ort", "fp32")]["status"] == "pass"
    assert rows[("ort", "int8")]["status"] == "unavailable" and "quantize" in rows[("ort", "int8")]["reason"]
    for key in ("rel_l2", "max_abs", "mean_abs", "pixel_agreement", "mean_dice", "worst_dice", "mean_iou",
                "flipped_pixels", "confident_flips", "tolerance", "reason"):
        assert key in rows[("ort", "fp32")]
    assert "torch" in out and "ort" in out
    assert Bundle.load(bundle_copy).manifest["verification"]["ort/fp32"]["status"] == "pass"  # recorded
    # A tolerance nobody can meet turns the same run into exit 1, and the bundle is not changed.
    before = (bundle_copy / "manifest.json").read_bytes()
    code, _, err = run("verify", "-b", str(bundle_copy), "--backend", "ort", "--precision", "fp32",
                       "--rel-l2", "0", "--pixel-agreement", "1")
    assert code == 1 and "missed tolerance" in err and "bundle not changed" in err
    assert (bundle_copy / "manifest.json").read_bytes() == before


def test_bench_json_keys(small_bundle: Path, tmp_path: Path) -> None:
    code, _, err = run("bench", "-b", str(small_bundle), "--backend", "ort", "--backend", "torch", "--shape",
                       "1x1x64x64", "--warmup", "1", "--iterations", "5", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["backend"] for r in results] == ["ort", "torch"]
    for r in results:
        for key in ("backend", "precision", "device", "shape", "warmup", "iterations", "latency_ms",
                    "throughput_ips", "cov", "peak_rss_mb", "versions"):
            assert key in r
        lat = r["latency_ms"]
        assert set(lat) == {"mean", "std", "min", "p50", "p90", "p95", "p99", "max"}
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["iterations"] == 5 and r["shape"] == [1, 1, 64, 64]
    assert results[0]["ratio_vs_first"] == 1.0


def test_bench_end_to_end_and_duration(small_bundle: Path, tmp_path: Path) -> None:
    code, _, err = run("bench", "-b", str(small_bundle), "--backend", "ort", "--shape", "1x1x50x70",
                       "--end-to-end", "--duration", "0.3", "--warmup", "0", "--json", "-")
    assert code == 0, err


def test_predict_writes_masks_and_overlays(small_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((2, 1, 40, 52), dtype=np.float32))
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "a.npy"), "-o", str(tmp_path / "o"),
                         "--backend", "ort")
    assert code == 0, err
    masks = np.load(tmp_path / "o" / "a_mask.npy")
    assert masks.shape == (2, 40, 52) and masks.dtype == np.uint8
    assert (tmp_path / "o" / "a_0_overlay.png").exists() and (tmp_path / "o" / "a_1_overlay.png").exists()


def test_predict_streams_and_a_late_failure_leaves_the_output_folder_as_it_was(small_bundle: Path,
                                                                                tmp_path: Path) -> None:
    """predict reads each file when the stream reaches it and stages each file's outputs as its
    slices finish: a bad file read after others were segmented (and staged) still leaves -o as it
    was (not made at all, or with exactly its old files), and a good run leaves no staging folder."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        np.save(src / f"s{i}.npy", rng.random((1, 1, 40, 52), dtype=np.float32))
    bad = np.zeros((1, 1, 40, 52), np.float32)
    bad[0, 0, 1, 1] = np.inf
    np.save(src / "s9.npy", bad)  # sorted last: read after s0..s3 were segmented and staged
    code, _, err = run("predict", "-b", str(small_bundle), str(src), "-o", str(tmp_path / "new"), "--backend", "ort")
    assert_clean_error(code, err, "s9.npy")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    code, _, err = run("predict", "-b", str(small_bundle), str(src), "-o", str(old), "--backend", "ort")
    assert code == 2 and "s9.npy" in err
    assert sorted(p.name for p in old.iterdir()) == ["keep.txt"]
    (src / "s9.npy").unlink()
    code, _, err = run("predict", "-b", str(small_bundle), str(src), "-o", str(old), "--backend", "ort")
    assert code == 0, err
    assert sorted(p.name for p in old.iterdir()) == sorted(
        ["keep.txt", *(f"s{i}_mask.npy" for i in range(4)), *(f"s{i}_overlay.png" for i in range(4))])
    assert np.load(old / "s2_mask.npy").shape == (40, 52)
    code, _, err = run("predict", "-b", str(small_bundle), str(src), "-o", str(old), "--backend", "ort")
    assert_clean_error(code, err, "exists")  # refused before any inference (the masks' names are known)


def test_info_and_doctor(small_bundle: Path) -> None:
    code, out, _ = run("info", "-b", str(small_bundle))
    assert code == 0 and "model.onnx" in out and "ort/fp32" in out
    assert "TensorRT lint fp32: ok" in out
    code, out, _ = run("doctor", "--json", "-")
    assert code == 0
    names = {p["name"]: p for p in json.loads(out)}
    assert {"python", "numpy", "torch", "onnx", "onnxruntime", "tensorrt", "cuda", "gpu"} <= set(names)
    assert names["onnxruntime"]["available"] and "CPUExecutionProvider" in names["onnxruntime"]["providers"]


def test_reexport_replaces_bundle_and_force_writes_into_foreign_dir(tmp_path: Path, small_ckpt: Path) -> None:
    out = tmp_path / "b"
    assert run("export", str(small_ckpt), "-o", str(out), "--exporter", "torchscript")[0] == 0
    first = Bundle.load(out).manifest["artifacts"]["model.onnx"]["sha256"]
    torch.save(popular_state_dict(1, 2, 8, seed=99), tmp_path / "other.pth")
    assert run("export", str(tmp_path / "other.pth"), "-o", str(out), "--exporter", "torchscript")[0] == 0
    assert Bundle.load(out).manifest["artifacts"]["model.onnx"]["sha256"] != first
    assert not list((out / ".attdeploy").glob("txn-*"))  # no staging leftovers
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert run("export", str(small_ckpt), "-o", str(foreign), "--force", "--exporter", "torchscript")[0] == 0
    assert (foreign / "keep.txt").read_text() == "x"
    Bundle.load(foreign)


# ---------------------------------------------------------------------------- interruption
def test_killed_export_leaves_previous_bundle_loadable(tmp_path: Path, small_bundle: Path) -> None:
    """SIGKILL `attdeploy export` at several points while it rewrites an existing bundle."""
    target = tmp_path / "deploy"
    shutil.copytree(small_bundle, target)
    before = json.loads((target / "manifest.json").read_text())["artifacts"]
    torch.save(popular_state_dict(1, 2, 8, seed=5), tmp_path / "new.pth")
    exe = [sys.executable, "-m", "attunet_deploy.cli", "export", str(tmp_path / "new.pth"), "-o", str(target),
           "--exporter", "torchscript"]
    # Kill when the export's transaction reaches each milestone: staging created, ONNX written,
    # golden set written.
    for milestone in ("", "model.onnx", "golden.npz"):
        proc = subprocess.Popen(exe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        reached = False
        while time.time() < deadline and proc.poll() is None:
            stages = list((target / ".attdeploy").glob(f"txn-{proc.pid}-*"))
            if stages and (not milestone or (stages[0] / "files" / milestone).exists()):
                reached = True
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert reached, f"export finished or stalled before reaching {milestone or 'staging'}"
        bundle = Bundle.load(target)  # checks every sha256
        assert bundle.manifest["artifacts"] == before  # still the old bundle, untouched
    # The next export clears what the killed ones left behind, and then replaces the bundle.
    assert run("export", str(tmp_path / "new.pth"), "-o", str(target), "--exporter", "torchscript")[0] == 0
    assert not list((target / ".attdeploy").glob("txn-*"))
    assert Bundle.load(target).manifest["artifacts"]["model.onnx"]["sha256"] != before["model.onnx"]["sha256"]


# ---------------------------------------------------------------------------- runner memory
def test_repeated_infer_does_not_grow_rss(small_bundle: Path) -> None:
    import psutil

    from attunet_deploy import load_runner

    x = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    proc = psutil.Process()
    with load_runner(small_bundle, backend="ort") as runner:
        for _ in range(50):
            runner.infer(x)
        before = proc.memory_info().rss
        for _ in range(500):
            runner.infer(x)
        after = proc.memory_info().rss
    assert after < before * 1.05, (before, after)


def test_predict_nifti_keeps_affine_and_reads_dicom_png(small_bundle: Path, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.data import get_testdata_file

    affine = np.array([[0.8, 0, 0, -100], [0, 0.8, 0, -120], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    vol = np.random.default_rng(0).random((40, 36, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "ct.nii.gz"))
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 44), dtype=np.uint8)).save(tmp_path / "s.png")
    dcm = get_testdata_file("CT_small.dcm")
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "ct.nii.gz"), str(tmp_path / "s.png"), dcm,
                       "-o", str(tmp_path / "out"), "--backend", "ort")
    assert code == 0, err
    mask = nib.load(str(tmp_path / "out" / "ct_mask.nii.gz"))
    assert mask.shape == (40, 36, 3) and np.allclose(mask.affine, affine)
    assert np.load(tmp_path / "out" / "s_mask.npy").shape == (30, 44)
    assert np.load(tmp_path / "out" / "CT_small_mask.npy").shape == (128, 128)
    overlays = sorted(p.name for p in (tmp_path / "out").glob("*_overlay.png"))
    assert overlays == ["CT_small_overlay.png", "ct_0_overlay.png", "ct_1_overlay.png", "ct_2_overlay.png",
                        "s_overlay.png"]


def test_doctor_flags_two_onnxruntime_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    from attunet_deploy import environment

    monkeypatch.setattr(environment, "onnxruntime_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    probe = environment.onnxruntime_probe()
    assert not probe.available and "pip uninstall -y onnxruntime onnxruntime-gpu" in probe.detail
    monkeypatch.setattr(environment, "onnxruntime_distributions", lambda: ["onnxruntime"])
    assert environment.onnxruntime_probe().available
