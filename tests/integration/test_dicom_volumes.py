"""DICOM CT series as volumes of a 3D bundle: a folder of one series is read as [1, D, H, W] in HU,
ordered along the slice normal whatever the file names, with spacing from PixelSpacing and the
slice positions; irregular gaps, gantry tilt, one lone file and a folder of two series are refused
with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
from attunet_deploy.demo.phantom3d import make_volume
from attunet_deploy.errors import InputError
from attunet_deploy.io.volumes import list_volumes, read_volume, volume_sha256


def test_series_folder_is_a_volume(tmp_path: Path) -> None:
    hu, label = make_volume(7, (12, 40, 44))
    # file names in reverse z order: the reader orders by position, not by name
    write_ct_series(tmp_path / "vols" / "case1", volume=hu, labels=label, name="z{:03d}.dcm",
                    geometry=SeriesGeometry(spacing=3.0, pixel_spacing=0.75))
    for f in (tmp_path / "vols" / "case1").iterdir():
        f.rename(f.with_name(f"{99 - int(f.stem[1:]):03d}.dcm"))
    np.save(tmp_path / "vols" / "other.npy", hu)
    assert list_volumes(tmp_path / "vols") == [tmp_path / "vols" / "case1", tmp_path / "vols" / "other.npy"]
    v = read_volume(tmp_path / "vols" / "case1", 1, tmp_path / "vols")
    assert v.rel == "case1" and v.voxels.shape == (1, 12, 40, 44)
    assert v.spacing == pytest.approx((3.0, 0.75, 0.75))
    np.testing.assert_allclose(v.voxels[0], np.round(hu), atol=0.51)  # int16 storage rounds
    assert read_volume(tmp_path / "vols" / "case1", 2).voxels.shape == (2, 12, 40, 44)
    sha = volume_sha256(tmp_path / "vols" / "case1")
    assert len(sha) == 64 and sha == volume_sha256(tmp_path / "vols" / "case1")


@pytest.mark.parametrize("problem", ["gap", "tilt", "two series", "one file"])
def test_series_that_is_not_a_volume_is_refused(tmp_path: Path, problem: str) -> None:
    hu, _ = make_volume(3, (8, 24, 24))
    folder = tmp_path / "s"
    z = [2.0 * k for k in range(8)]
    positions = [(-12.0, -12.0, zk) for zk in z]
    if problem == "gap":
        positions[5:] = [(x, y, zk + 2.0) for x, y, zk in positions[5:]]  # a missing slice
    elif problem == "tilt":
        positions = [(-12.0, -12.0 + 0.2 * zk, zk) for zk in z]  # about 11 degrees
    write_ct_series(folder, volume=hu, geometry=SeriesGeometry(spacing=2.0, positions=tuple(positions)))
    target = folder
    if problem == "two series":
        write_ct_series(folder, volume=hu, name="b{:03d}.dcm", geometry=SeriesGeometry(spacing=2.0))
    elif problem == "one file":
        target = next(folder.iterdir())
    expected = {"gap": "not a regular volume", "tilt": "gantry tilt", "two series": "one series per folder",
                "one file": "give the folder of its series"}[problem]
    with pytest.raises(InputError, match=expected):
        read_volume(target, 1) if problem != "one file" else list_volumes(target)
