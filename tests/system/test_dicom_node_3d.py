"""A 3D bundle at the scanner: the DICOM node (real sockets, DCMTK's storescu as the scanner) turns a
60-slice CT series into one SEG whose frames equal ``segment_volume`` of the series volume at its own
spacing, and ``predict --dicom-seg`` writes the same masks without a network. Both SEGs pass dciodvfy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("torch")

from click.testing import CliRunner
from dicomnet import dciodvfy_errors, need_tools, node, storescu, wait_for

from attunet_deploy import load_runner
from attunet_deploy.apps.dicom.seg import referenced_masks
from attunet_deploy.cli import main
from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
from attunet_deploy.demo.phantom3d import make_volume

SPACING = (2.5, 3.0, 3.0)  # z, y, x mm: finer than the demo's 5 x 6 x 6, so the node resamples


@pytest.fixture(scope="module")
def bundle3d(demo3d_bundle: Path) -> Path:
    return demo3d_bundle


def test_node_segments_a_3d_series_as_one_volume(bundle3d: Path, tmp_path: Path) -> None:
    need_tools("storescu", "dciodvfy")
    hu, _ = make_volume(4242, (60, 112, 112))
    slices = write_ct_series(tmp_path / "ct", volume=hu, geometry=SeriesGeometry(spacing=SPACING[0],
                                                                                 pixel_spacing=SPACING[1]))
    with load_runner(bundle3d, backend="ort") as runner:
        expected = runner.segment_volume(np.stack([s.hu for s in slices]), spacing=SPACING)
    assert expected.any() and not expected.all()
    uids = [s.sop_instance_uid for s in slices]

    out = tmp_path / "out"
    with node(bundle3d, out, "--log-json", "--backend", "ort") as (port, log, _):
        t0 = time.perf_counter()
        assert storescu(port, *sorted((tmp_path / "ct").glob("*.dcm"))) == ["0x0000"] * 60
        wait_for(lambda: list((out / "seg").glob("*.dcm")), 120, "the SEG")
        elapsed = time.perf_counter() - t0
    (seg_path,) = (out / "seg").glob("*.dcm")
    np.testing.assert_array_equal(referenced_masks(seg_path, uids), expected)
    assert dciodvfy_errors(seg_path) == []
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    ready = next(e for e in lines if e["event"] == "ready")
    assert "no segmenting ahead" in ready["message"]
    written = next(e for e in lines if e["event"] == "written")
    assert written["slices"] == 60 and written["segmented_ahead"] == 0 and written["segment_seconds"] < elapsed
    assert 0 <= written["decoded_ahead"] <= 60  # slices decoded while the series arrived

    # file mode, same masks
    r = CliRunner().invoke(main, ["predict", "-b", str(bundle3d), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "segs"), "--backend", "ort"])
    assert r.exit_code == 0, r.output[-2000:]
    (file_seg,) = (tmp_path / "segs").glob("*.dcm")
    np.testing.assert_array_equal(referenced_masks(file_seg, uids), expected)
    assert dciodvfy_errors(file_seg) == []


def test_irregular_3d_series_is_refused_with_the_reason(bundle3d: Path, tmp_path: Path) -> None:
    # 36 slices at 2.5 mm: deep enough for the gate's default (half the demo's 32 x 5 mm window = 80 mm)
    hu, _ = make_volume(7, (36, 64, 64))
    z = [2.5 * k + (2.5 if k >= 18 else 0.0) for k in range(36)]  # one slice missing
    write_ct_series(tmp_path / "ct", volume=hu, geometry=SeriesGeometry(positions=tuple([(-32.0, -32.0,
                                                                                          zk) for zk in z])))
    r = CliRunner().invoke(main, ["predict", "-b", str(bundle3d), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "segs"), "--backend", "ort"])
    assert r.exit_code == 2 and "not a regular volume" in r.output, r.output[-2000:]
    assert not (tmp_path / "segs").exists()


def test_crafted_pixel_spacing_cannot_blow_the_volume_up(bundle3d: Path, tmp_path: Path) -> None:
    """PixelSpacing 1000 mm would resample a 64x64 slice to 10,667 voxels a side at the model's 6 mm:
    refused in one line before it is allocated."""
    hu, _ = make_volume(8, (34, 64, 64))  # deep enough for the acceptance gate: refused for its spacing
    write_ct_series(tmp_path / "ct", volume=hu, geometry=SeriesGeometry(spacing=2.5, pixel_spacing=1000.0))
    r = CliRunner().invoke(main, ["predict", "-b", str(bundle3d), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "segs"), "--backend", "ort"])
    assert r.exit_code == 2 and "PixelSpacing [1000.0, 1000.0] mm is outside 0.01-50 mm" in r.output \
        and "Traceback" not in r.output, r.output[-2000:]
    assert not (tmp_path / "segs").exists() or not any((tmp_path / "segs").iterdir())

