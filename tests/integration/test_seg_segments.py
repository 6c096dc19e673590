"""What each class is called in a DICOM SEG: ``export --segment CLASS=LABEL[@SCHEME:CODE:MEANING]``
records it in the manifest (validated on load), and ``predict --dicom-seg`` writes one segment per
class with that label and segmented property type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("highdicom")

from popular import popular_state_dict  # noqa: E402

from attunet_deploy.bundle import Bundle  # noqa: E402
from attunet_deploy.cli import main  # noqa: E402
from attunet_deploy.demo.ctseries import write_ct_series  # noqa: E402
from attunet_deploy.errors import BundleError  # noqa: E402


def test_named_classes_reach_the_seg(tmp_path: Path) -> None:
    import highdicom as hd

    torch.save(popular_state_dict(1, 3, 8, head="Conv_1x1", seed=4), tmp_path / "three.pth")
    runner = CliRunner()
    bad = runner.invoke(main, ["export", str(tmp_path / "three.pth"), "-o", str(tmp_path / "x"),
                               "--segment", "3=Kidney"])
    assert bad.exit_code == 2 and "CLASS in 1..2" in bad.stderr and not (tmp_path / "x").exists()
    r = runner.invoke(main, ["export", str(tmp_path / "three.pth"), "-o", str(tmp_path / "b"), "--exporter",
                             "torchscript", "--segment", "1=Liver@SCT:10200004:Liver", "--segment", "2=Spleen"])
    assert r.exit_code == 0, r.stderr
    segments = [s.to_dict() for s in Bundle.load(tmp_path / "b").spec.postprocessing.segments]
    assert segments == [{"class": 1, "label": "Liver", "type": ["SCT", "10200004", "Liver"]},
                        {"class": 2, "label": "Spleen"}]
    write_ct_series(tmp_path / "ct", 3, (64, 64), seed=5)
    r = runner.invoke(main, ["predict", "-b", str(tmp_path / "b"), str(tmp_path / "ct"), "--dicom-seg", "-o",
                             str(tmp_path / "segs"), "--backend", "ort"])
    assert r.exit_code == 0, r.stderr
    (path,) = (tmp_path / "segs").glob("*.dcm")
    seg = hd.seg.segread(str(path))
    described = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence]
    assert described == [("Liver", "10200004"), ("Spleen", "113343008")]  # unnamed code: the neutral default (Organ)

    manifest = tmp_path / "b" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["postprocessing"]["segments"][0]["label"] = "Liver\\Spleen"  # a DICOM multi-value separator
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"postprocessing\.segments\[0\]"):
        Bundle.load(tmp_path / "b")
