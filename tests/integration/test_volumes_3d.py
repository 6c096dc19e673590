"""A 3D checkpoint through the whole pipeline on the user's own volumes (NIfTI files and DICOM series
folders) with NIfTI labels: the
golden volumes and the calibration volumes are disjoint, every row carries Dice against the
labels per volume, and INT8 is calibrated on windows of the other volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from test_export_families import _oktay  # noqa: E402

from attunet_deploy.bundle import Bundle  # noqa: E402
from attunet_deploy.cli import main  # noqa: E402
from attunet_deploy.io.volumes import read_volume  # noqa: E402


def _volumes(root: Path, n: int = 6, dicom_from: int | None = None) -> tuple[Path, Path]:
    """NIfTI volumes (x, y, z order, 1.5 mm slices) of a bright ellipsoid in noise, and its labels;
    from case ``dicom_from`` on, the volume is a DICOM CT series folder instead (labels stay NIfTI)."""
    imgs, labs = root / "vols", root / "labels"
    imgs.mkdir()
    labs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(24 + 2 * i), indexing="ij")
        c = rng.uniform(0.35, 0.65, 3) * np.array([40, 36, 24 + 2 * i])
        mask = ((x - c[0]) / 9) ** 2 + ((y - c[1]) / 7) ** 2 + ((z - c[2]) / 5) ** 2 < 1
        vol = (rng.normal(0, 20, mask.shape) + 100 * mask).astype(np.float32)
        affine = np.diag([0.8, 0.8, 1.5, 1.0])
        if dicom_from is not None and i >= dicom_from:
            from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series

            write_ct_series(imgs / f"case{i}", volume=vol.transpose(2, 1, 0), geometry=SeriesGeometry(spacing=1.5,
                                                                                                      pixel_spacing=0.8))
        else:
            nib.save(nib.Nifti1Image(vol, affine), imgs / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), labs / f"case{i}.nii.gz")
    return imgs, labs


def test_nifti_volumes_read_as_d_h_w_with_spacing(tmp_path: Path) -> None:
    imgs, _ = _volumes(tmp_path, 1)
    v = read_volume(imgs / "case0.nii.gz", 1)
    assert v.voxels.shape == (1, 24, 36, 40) and v.spacing == pytest.approx((1.5, 0.8, 0.8))


def test_pipeline_on_user_volumes(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    _oktay(tmp_path / "ck.pth", "multi_att_dsv")
    pytest.importorskip("pydicom")
    imgs, labs = _volumes(tmp_path, dicom_from=3)
    r = CliRunner().invoke(main, ["pipeline", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), "--calib",
                                  str(imgs), "--labels", str(labs), "--normalize", "mean-std:100,50",
                                  "--bench-iterations", "2", "--shape", "1x1x32x32x32"], catch_exceptions=True)
    assert r.exit_code == 0, r.stderr[-3000:]
    b = Bundle.load(tmp_path / "b")
    golden = {s.file for s in b.golden.sources}
    calib = set(b.manifest["artifacts"]["model.int8.onnx"]["producer"]["calibration_files"])
    assert golden and calib and not golden & calib  # disjoint, by file
    assert len(golden) == 2 and b.golden.kind == "user-volumes"  # round(6 / 4)
    assert golden | calib == {f"case{i}{'' if i >= 3 else '.nii.gz'}" for i in range(6)}  # series folders too
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    ran = [row for row in report["verification"] if row["status"] != "unavailable"]
    assert {(row["backend"], row["precision"]) for row in ran} >= {("torch", "fp32"), ("ort", "fp32"),
                                                                   ("ort", "fp16"), ("ort", "int8")}
    for row in ran:
        assert row["images"] == 2 and 0.0 <= row["gt_dice"] <= 1.0 and "gt_dice_drop" in row
    assert all(row["shape"] == [1, 1, 32, 32, 32] for row in report["benchmarks"])
