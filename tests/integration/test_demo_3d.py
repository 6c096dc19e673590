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


def test_pipeline_demo_3d(tmp_path: Path, demo_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a newcomer runs it after the 2D quickstart: in a folder whose ./deploy holds the 2D demo,
    `pipeline --demo 3d` writes ./deploy3d and leaves ./deploy byte for byte as it was (issue 35)."""
    import hashlib
    import shutil

    assert DEMO3D_WEIGHTS.is_file()
    shutil.copytree(demo_bundle, tmp_path / "deploy")

    def digest() -> dict[str, str]:
        return {p.relative_to(tmp_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / "deploy").rglob("*")) if p.is_file()}

    before = digest()
    monkeypatch.chdir(tmp_path)
    refused = CliRunner().invoke(main, ["pipeline", "--demo", "3d", "-o", "deploy"])
    assert refused.exit_code == 2 and "holds the bundle of the 2D demo, not the 3D demo" in refused.output
    r = CliRunner().invoke(main, ["pipeline", "--demo", "3d", "--bench-iterations", "2"], catch_exceptions=True)
    assert r.exit_code == 0, r.output[-3000:]
    assert digest() == before
    b = Bundle.load(tmp_path / "deploy3d")
    assert (b.family, b.layout, b.sliding_window.roi, b.spacing) == ("oktay3d", "NCDHW", (32, 48, 48),
                                                                         (5.0, 6.0, 6.0))
    rows = json.loads((tmp_path / "deploy3d" / "report.json").read_text())["verification"]
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
    # TensorRT: the default profile has the roi as optimum and covers the golden windows; every graph lints clean
    from attunet_deploy.steps.engines import bundle_profile

    profile = bundle_profile(b)
    assert profile.opt == (1, 1, 32, 48, 48)
    assert all(profile.contains(tuple(-(-n // 16) * 16 if i > 1 else n for i, n in enumerate(shape)))
               for shape in b.manifest["artifacts"]["golden.npz"]["shapes"])
    assert all(b.manifest["artifacts"][f]["trt_lint"] == [] for f in ("model.onnx", "model.fp16.onnx",
                                                                      "model.int8.onnx"))
    _verify_on_user_volumes(tmp_path, tmp_path / "deploy3d")
    _nncf_graph_for_3d(tmp_path / "deploy3d")


def _nncf_graph_for_3d(bundle: Path) -> None:
    """quantize --target openvino on a 3D bundle: NNCF's graph keeps the grid gates' theta convs in
    float (with them quantised it misses the Dice gate on OpenVINO) and passes on OpenVINO."""
    pytest.importorskip("nncf")
    from attunet_deploy.bundle import OV_INT8_XML

    r = CliRunner().invoke(main, ["quantize", "-b", str(bundle), "--precision", "int8", "--target", "openvino",
                                  "--max-samples", "4"])
    assert r.exit_code == 0, r.output[-3000:]
    scope = Bundle.load(bundle).manifest["artifacts"][OV_INT8_XML]["producer"]["ignored_scope"]
    assert sum("theta" in n for n in scope) == 6 and sum("psi" in n for n in scope) == 6
    out = bundle.parent / "ov3d.json"
    r = CliRunner().invoke(main, ["verify", "-b", str(bundle), "--backend", "ov", "--precision", "int8",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["status"] == "pass" and row["device"] == "cpu (NNCF IR)" and row["mean_dice"] >= 0.98


def _verify_on_user_volumes(tmp_path: Path, bundle: Path) -> None:
    """verify --images on a 3D bundle: a NIfTI volume and a DICOM series folder, each judged whole
    through the sliding window, with NIfTI labels."""
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
    from attunet_deploy.demo.phantom3d import make_volume

    imgs, labs = tmp_path / "vols", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    affine = np.diag([4.8, 4.8, 4.0, 1.0])  # nibabel's (x, y, z) order
    for i in range(2):
        hu, label = make_volume(500 + i, size=(40, 80, 80))
        if i == 0:
            nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0), affine), imgs / "a.nii.gz")
        else:
            write_ct_series(imgs / "b", volume=hu, geometry=SeriesGeometry(spacing=4.0, pixel_spacing=4.8))
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), labs / f"{'ab'[i]}.nii.gz")
    out = tmp_path / "verify.json"
    r = CliRunner().invoke(main, ["verify", "-b", str(bundle), "--images", str(imgs), "--labels", str(labs),
                                  "--backend", "ort", "--precision", "fp32", "--precision", "int8", "--json", str(out),
                                  "--report", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(row["backend"], row["precision"]) for row in rows} == {("ort", "fp32"), ("ort", "int8")}
    for row in rows:
        assert row["status"] == "pass" and row["images"] == 2, row
        assert row["gt_dice"] >= 0.8, row  # whole volumes resampled to 5x6x6 mm: the model finds the organ
        assert len(row["dice_per_image"]) == len(row["gt_dice_per_image"]) == 2
    # report.html shows each row's worst volumes by their worst axial slice
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('class="panel"') == 4 and page.count("(axial slice ") >= 4 and "a.nii.gz" in page
    assert json.loads((tmp_path / "report" / "report.json").read_text())["notes"]["Images"].startswith("Judged on")
