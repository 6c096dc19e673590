"""Robustness round 4 (issue 34): a runner checks itself before it answers, and caches cannot lie.

- A corrupted OpenVINO cache blob is found by its digest sidecar and rebuilt; one whose sidecar was
  forged to match is caught by the self-check, which refuses to run (never wrong masks).
- The digest logic on a TensorRT-EP-style cache entry (a stand-in file: no TensorRT here; this
  tests our logic, not TensorRT).
- (A listed NNCF graph that is missing is an error, not a silent run of the Q/DQ graph: in
  tests/integration/test_int8_methods_openvino.py, which writes that graph anyway.)
- The per-machine choice caches are untrusted input: a FIFO, a symlink to /dev/zero, wrong shapes,
  an unknown backend and an edited choice that fails verification here are each deleted or chosen
  again, with a note, never a hang, an exit 3 or a failing precision run as "the fastest that passes".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attunet_deploy import load_runner
from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main
from attunet_deploy.demo import make_phantoms
from attunet_deploy.runtimes import cachedigest
from attunet_deploy.runtimes.selfcheck import SelfCheckFailed


@pytest.fixture
def demo_copy(tmp_path: Path, demo_bundle: Path) -> Path:
    dst = tmp_path / "demo"
    shutil.copytree(demo_bundle, dst, ignore=shutil.ignore_patterns("engines"))
    return dst


def flip(path: Path, n: int = 50) -> bytes:
    data = bytearray(path.read_bytes())
    for k in range(n):
        data[(len(data) // 2 + 97 * k) % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_corrupted_openvino_blob_is_rebuilt_and_a_forged_one_refused(demo_copy: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino")
    hu, _ = make_phantoms(3, seed=9)
    with load_runner(demo_copy, backend="ort") as ort:
        want = ort.segment(hu)
    with load_runner(demo_copy, backend="ov") as ov:
        assert ov.self_check_seconds is not None
        np.testing.assert_array_equal(ov.segment(hu), want)
    cache = demo_copy / "engines" / "openvino"
    blobs = sorted(cache.glob("*.blob"))
    assert blobs and all((cache / (b.name + ".sha256")).is_file() for b in blobs)  # sealed after the check
    for b in blobs:
        flip(b)
    with load_runner(demo_copy, backend="ov") as ov:  # digests miss: deleted, rebuilt, right
        np.testing.assert_array_equal(ov.segment(hu), want)
    assert "did not match their recorded digest and were deleted" in capfd.readouterr().err
    for b in sorted(cache.glob("*.blob")):  # now forge the sidecars too: only the self-check stands
        (cache / (b.name + ".sha256")).write_text(hashlib.sha256(flip(b)).hexdigest() + "\n")
    with pytest.raises(SelfCheckFailed, match=f"delete {cache}") as err:
        load_runner(demo_copy, backend="ov").activate()
    assert "refuses to run" in str(err.value)
    r = CliRunner().invoke(main, ["predict", "-b", str(demo_copy), "--backend", "ov", str(demo_copy / "golden.npz"),
                                  "-o", str(demo_copy.parent / "out")])
    assert r.exit_code in (1, 2) and "refuses to run" in r.output and "Traceback" not in r.output


def test_digest_logic_on_a_tensorrt_ep_style_cache_entry(tmp_path: Path) -> None:
    """A stand-in file named as the EP names its engines: our check/seal logic, not TensorRT."""
    engine = tmp_path / "TensorrtExecutionProvider_TRTKernel_graph_main_1234_0_0_sm90.engine"
    engine.write_bytes(os.urandom(4096))
    said: list[str] = []
    assert cachedigest.check(tmp_path, ("*.engine",), said.append) == [engine.name]  # unsealed: not trusted
    engine.write_bytes(os.urandom(4096))
    cachedigest.seal(tmp_path, ("*.engine",))
    assert cachedigest.check(tmp_path, ("*.engine",), said.append) == []  # sealed and intact: kept
    flip(engine)
    assert cachedigest.check(tmp_path, ("*.engine",), said.append) == [engine.name]
    assert not engine.exists() and not (tmp_path / (engine.name + ".sha256")).exists() and len(said) == 2


# ------------------------------------------------------------------ 2. caches as untrusted input
@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("ATTDEPLOY_CACHE_DIR", str(d))
    monkeypatch.setenv("ATTDEPLOY_AUTO_MEASURE", "1")
    return d


def best(bundle: Path) -> tuple[str, str]:
    from attunet_deploy.judge.best import resolve_best

    choice = resolve_best(Bundle.load(bundle), "ort")
    return choice.backend, choice.precision


def test_a_fifo_or_a_device_in_place_of_a_cache_is_deleted_not_read(demo_copy: Path, cache: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(cache / "best-precision.json")
    t0 = time.monotonic()
    assert best(demo_copy)[0] == "ort"  # was a hang
    assert time.monotonic() - t0 < 60 and "is invalid" in capfd.readouterr().err
    assert (cache / "best-precision.json").is_file()  # measured and kept again
    (cache / "best-precision.json").unlink()
    (cache / "best-precision.json").symlink_to("/dev/zero")  # was 1 GB of RSS in 1.6 s
    best(demo_copy)
    assert not (cache / "best-precision.json").is_symlink() and "is invalid" in capfd.readouterr().err


@pytest.mark.parametrize("content", ['[1, 2, 3]', '{"k": 5}', '{"k": {"backend": "warp-drive", "precision": "int8"}}',
                                     '{"k": {"backend": "ort", "precision": "fp64"}}', '{"k": ' * 50, '\xff\xfe'])
def test_wrong_shaped_cache_entries_are_deleted_with_a_note(demo_copy: Path, cache: Path, content: str,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    from attunet_deploy.judge.best import CACHE_FILE, valid_entry
    from attunet_deploy.runtimes.select import read_cache

    (cache / CACHE_FILE).write_text(content, encoding="latin-1")
    assert read_cache(CACHE_FILE, valid_entry) == {}  # was exit 3, or an unknown backend named as if typed
    assert "invalid" in capfd.readouterr().err


def test_an_edited_choice_that_fails_verification_here_is_chosen_again(demo_copy: Path, cache: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    from attunet_deploy.judge import verify
    from attunet_deploy.judge.best import CACHE_FILE, best_key
    from attunet_deploy.judge.results import Tolerance

    # int8 fails here (an impossible Dice bound stands in for a precision that does not pass this machine)
    monkeypatch.setitem(verify.DEFAULT_TOLERANCES, "int8", Tolerance(mean_dice=1.0, worst_dice=1.0, rel_l2=0.0))
    key = best_key(Bundle.load(demo_copy), "ort")
    (cache / CACHE_FILE).write_text(json.dumps({key: {"backend": "ort", "precision": "int8", "candidates": []}}))
    _, precision = best(demo_copy)
    assert precision != "int8"  # was: int8 run as "the fastest that passes verification"
    assert "does not pass verification here" in capfd.readouterr().err


def test_a_resealed_graph_of_another_network_is_refused_not_run(demo_copy: Path, small_bundle: Path) -> None:
    """model.onnx swapped for another network and the manifest's digest made to match (what an
    attacker or a bad copy script does): the runner refuses (exit 1), never exit 3 or wrong masks."""
    data = (small_bundle / "model.onnx").read_bytes()
    (demo_copy / "model.onnx").write_bytes(data)
    manifest = json.loads((demo_copy / "manifest.json").read_text())
    manifest["artifacts"]["model.onnx"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (demo_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SelfCheckFailed, match="refuses to run"):
        load_runner(demo_copy, backend="ort").activate()
    np.save(demo_copy.parent / "x.npy", np.zeros((1, 64, 64), np.float32))
    r = CliRunner().invoke(main, ["predict", "-b", str(demo_copy), "--backend", "ort", str(demo_copy.parent / "x.npy"),
                                  "-o", str(demo_copy.parent / "out")])
    assert r.exit_code == 1 and r.output.startswith("error: ort/fp32 refuses to run"), r.output
