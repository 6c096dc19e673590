"""``--precision best``: the fastest precision that passes verification on this machine, never one
that fails it, measured once per machine and graphs (then cached)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attunet_deploy import load_runner
from attunet_deploy.cli import main


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_best_never_picks_a_precision_that_fails_here(demo_bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    air = tmp_path / "air"
    air.mkdir()
    np.save(air / "air.npy", np.full((4, 1, 128, 128), -1000.0, np.float32))  # useless INT8 scales
    code, _, err = run("quantize", "-b", str(b), "--precision", "int8", "--calib", str(air), "--method", "minmax",
                       "--no-verify")
    assert code == 0, err
    with load_runner(b, backend="ort", precision="best") as runner:
        assert runner.precision in ("fp32", "fp16") and runner.backend == "ort"
    (entry,) = json.loads((tmp_path / "cache" / "best-precision.json").read_text()).values()
    by = {c["precision"]: c for c in entry["candidates"]}
    assert by["int8"]["status"] == "fail" and by["int8"]["p50_ms"] is None  # judged here, never timed
    passing = {p: c["p50_ms"] for p, c in by.items() if c["status"] == "pass"}
    assert entry["precision"] == min(passing, key=lambda p: passing[p]) and "fp32" in passing

    np.save(tmp_path / "img.npy", np.zeros((1, 96, 96), np.float32))
    code, _, err = run("predict", "-b", str(b), str(tmp_path / "img.npy"), "-o", str(tmp_path / "out"),
                       "--backend", "ort", "--precision", "best")
    assert code == 0, err
    assert "--precision best:" in err and f"ort/{entry['precision']}" in err and "cached" in " ".join(err.split())
    assert (tmp_path / "out" / "img_mask.npy").is_file()
    from attunet_deploy.environment import tensorrt_probe

    if not tensorrt_probe().available:  # a backend that cannot run here: one line naming why, exit 2
        code, _, err = run("predict", "-b", str(b), str(tmp_path / "img.npy"), "-o", str(tmp_path / "o2"),
                           "--backend", "trt", "--precision", "best")
        assert code == 2 and "--precision best: no precision" in err and "trt/fp32" in err
        assert len(err.strip().splitlines()) == 1
