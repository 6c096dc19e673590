"""Robustness round 4 (issue 34) through the CLI: each case the issue lists, by its group, as the
user met it (exit codes and the one line), on real bundles. Logic without a model is in
tests/unit/test_robustness_round4.py; the self-check and the caches in test_self_check_and_caches.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attunet_deploy.cli import main

PY = sys.executable


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """attdeploy as a process (exit code, stdout + stderr)."""
    p = subprocess.run([PY, "-m", "attunet_deploy.cli", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stdout + p.stderr


def one_error_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in out
    return line


# ------------------------------------------------------------------ 3. limit variables
@pytest.mark.parametrize("value", ["1e308", "0.5"])
def test_a_bad_limit_variable_is_exit_2_naming_it(small_ckpt: Path, tmp_path: Path, value: str) -> None:
    code, out = cli("export", str(small_ckpt), "-o", str(tmp_path / "b"),
                    env={"ATTDEPLOY_MAX_CHECKPOINT_MB": value} if value != "0.5" else
                    {"ATTDEPLOY_MAX_JSON_DEPTH": value})
    assert code == 2 and "ATTDEPLOY_MAX_" in one_error_line(out), out[-800:]


# ------------------------------------------------------------------ 4. DICOM text
@pytest.mark.parametrize("label, says", [("a\\b", "backslash"), ("x" * 70, "at most 64"),
                                         ("Liver\x07", "control characters")])
def test_a_segment_label_that_cannot_be_dicom_text_is_exit_2_before_any_work(demo_bundle: Path, tmp_path: Path,
                                                                             label: str, says: str) -> None:
    from attunet_deploy.demo.ctseries import write_ct_series

    write_ct_series(tmp_path / "ct", 2, (64, 64))
    r = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "o"), "--segment-label", label])
    assert r.exit_code == 2 and says in r.output and r.output.startswith("error: --segment-label"), r.output
    assert not (tmp_path / "o").exists()


def test_a_non_ascii_label_is_written_as_utf8_and_valid(demo_bundle: Path, tmp_path: Path) -> None:
    from dicomnet import dciodvfy_errors, need_tools

    need_tools("dciodvfy")
    import pydicom

    from attunet_deploy.demo.ctseries import write_ct_series

    write_ct_series(tmp_path / "ct", 4, (96, 96))
    label = "膵臓 Bauchspeicheldrüse"
    r = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "o"), "--segment-label", label, "--backend", "ort"])
    assert r.exit_code == 0, r.output
    (seg,) = (tmp_path / "o").glob("SEG_*.dcm")
    ds = pydicom.dcmread(seg)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.SegmentSequence[0].SegmentLabel == label
    assert dciodvfy_errors(seg) == []  # was: '?? Bauchspeicheldrüse' without a character set


# ------------------------------------------------------------------ 5. geometry
def test_an_orientation_that_is_not_unit_vectors_is_refused_naming_it(demo_bundle: Path, tmp_path: Path) -> None:
    from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series

    write_ct_series(tmp_path / "ct", 4, (64, 64), geometry=SeriesGeometry(orientation=(2.0, 0, 0, 0, 2.0, 0)))
    r = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2 and "lengths 2 and 2, not 1" in r.output, r.output  # was a SEG at spacing 20 mm
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 7. predict -o
def test_overwrite_onto_a_directory_is_refused_before_the_first_output_is_committed(small_bundle: Path,
                                                                                   tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((1, 48, 48)).astype(np.float32))
    out = tmp_path / "out"
    (out / "b_mask.npy").mkdir(parents=True)
    r = CliRunner().invoke(main, ["predict", "-b", str(small_bundle), str(tmp_path / "a.npy"),
                                  str(tmp_path / "b.npy"), "-o", str(out), "--overwrite", "--no-overlay"])
    assert r.exit_code == 2 and "is a directory" in r.output, r.output  # was exit 3 after a_mask.npy was committed
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.npy"]


def test_a_staging_folder_left_by_a_killed_predict_is_removed_by_the_next_run(small_bundle: Path,
                                                                             tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 48, 48), np.float32))
    out = tmp_path / "out"
    stale = out / ".attdeploy-staging.dead1234"
    stale.mkdir(parents=True)
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()  # a pid that has exited
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    boot = boot_id.read_text().strip() if boot_id.exists() else "-"
    (stale / ".owner").write_text(f"{dead.pid} {boot}\n")
    (stale / "0_mask.npy").write_bytes(b"half")
    alive = out / ".attdeploy-staging.alive"
    alive.mkdir()
    (alive / ".owner").write_text(f"{os.getpid()} {boot}\n")  # a live writer's folder is left alone
    r = CliRunner().invoke(main, ["predict", "-b", str(small_bundle), str(tmp_path / "a.npy"), "-o", str(out),
                                  "--no-overlay"])
    assert r.exit_code == 0, r.output
    assert not stale.exists() and alive.exists() and (out / "a_mask.npy").is_file()


# ------------------------------------------------------------------ 8. reports
def test_report_md_escapes_file_names_and_json_cannot_overwrite_the_report(small_bundle: Path,
                                                                          tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    evil = '"><img src=x onerror=alert(2)>'
    for name in (evil, "plain"):
        np.save(images / f"{name}.npy", np.random.default_rng(1).standard_normal((1, 48, 48)).astype(np.float32))
    code, out = cli("verify", "-b", str(small_bundle), "--images", str(images), "--backend", "ort", "--report",
                    str(tmp_path / "R"))
    assert code in (0, 1), out[-1500:]
    md = (tmp_path / "R" / "report.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert\\(2\\)&gt;" in md  # was the payload verbatim
    (tmp_path / "R2").mkdir()
    code, out = cli("verify", "-b", str(small_bundle), "--backend", "ort", "--report", str(tmp_path / "R2"),
                    "--json", str(tmp_path / "R2" / "report.json"))
    assert code == 2 and "the report's own report.json" in one_error_line(out)


# ------------------------------------------------------------------ 9. exit codes
def test_nncf_that_fails_to_import_is_exit_2_before_calibration(demo_bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "site"
    (broken / "nncf").mkdir(parents=True)
    (broken / "nncf" / "__init__.py").write_text("raise ImportError('broken nncf install (a test)')\n")
    t0 = time.monotonic()
    code, out = cli("quantize", "-b", str(demo_bundle), "--precision", "int8", "--target", "openvino",
                    env={"PYTHONPATH": f"{broken}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert code == 2 and "cannot be imported" in one_error_line(out), out[-800:]  # was exit 1 after 18 s
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------ 10. triton -o
def test_triton_rerun_refuses_to_delete_files_it_did_not_write(demo_bundle: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["triton", "-b", str(demo_bundle), "-o", str(repo), "--kind", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((repo / ".attdeploy-triton").read_text())["files"]
    (repo / "attunet_fp32" / "__pycache__").mkdir()
    (repo / "attunet_fp32" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")  # Triton's own: fine
    r = CliRunner().invoke(main, ["triton", "-b", str(demo_bundle), "-o", str(repo), "--kind", "cpu"])
    assert r.exit_code == 0, r.output  # a re-run over its own files still replaces them
    (repo / "my_notes.txt").write_text("mine")
    (repo / "my_model").mkdir()
    (repo / "my_model" / "config.pbtxt").write_text("mine")
    r = CliRunner().invoke(main, ["triton", "-b", str(demo_bundle), "-o", str(repo), "--kind", "cpu"])
    assert r.exit_code == 2 and "my_model/config.pbtxt, my_notes.txt" in r.output, r.output
    assert (repo / "my_notes.txt").read_text() == "mine" and (repo / "my_model" / "config.pbtxt").exists()
