"""The bundled 3D demo end to end: ``attdeploy pipeline --demo 3d`` exports the paper's 3D network
(trained on synthetic CT volumes) to an NCDHW bundle with a 32x48x48 sliding window, quantises it with
INT8 calibrated on phantom volumes, verifies every CPU backend on golden phantom volumes with labels
and benchmarks one window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from attunet_deploy import load_runner
from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main
from attunet_deploy.demo import DEMO3D_WEIGHTS


def test_pipeline_demo_3d(tmp_path: Path) -> None:
    assert DEMO3D_WEIGHTS.is_file()
    r = CliRunner().invoke(main, ["pipeline", "--demo", "3d", "-o", str(tmp_path / "b"), "--bench-iterations", "2"],
                           catch_exceptions=True)
    assert r.exit_code == 0, r.output[-3000:]
    b = Bundle.load(tmp_path / "b")
    assert (b.family, b.layout, b.sliding_window["roi"], b.spacing) == ("oktay3d", "NCDHW", [32, 48, 48],
                                                                         (5.0, 6.0, 6.0))
    rows = json.loads((tmp_path / "b" / "report.json").read_text())["verification"]
    ran = {(row["backend"], row["precision"]): row for row in rows if row["status"] != "unavailable"}
    assert {("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8")} <= set(ran)
    assert all(row["status"] == "pass" for row in ran.values()), ran
    for key, row in ran.items():
        assert row["gt_dice"] >= 0.85, (key, row["gt_dice"])  # the demo model finds the target organ
        if key[1] != "fp32":
            assert row["mean_dice"] >= 0.98, key
    # A whole volume through the sliding window, at the volume's own spacing.
    from attunet_deploy.demo.phantom3d import make_volume

    hu, label = make_volume(424242, size=(40, 80, 80))  # finer than the model's grid: resampled to it
    with load_runner(b, backend="ort") as runner:
        mask = runner.segment_volume(hu, spacing=(4.0, 4.8, 4.8))
    assert mask.shape == hu.shape
    dice = 2 * (mask & label).sum() / max(1, mask.sum() + label.sum())
    assert dice >= 0.7, dice
    assert np.array_equal(np.unique(mask), [0, 1])
