"""The clinical layer through ``predict --dicom-seg``: the series acceptance gate (built-in defaults,
a rules file, ``--force``), the QA flag against the bundle's input profile, the four outputs (SEG,
RTSTRUCT, Secondary Capture overlay, TID 1500 SR) judged by third parties (dicom3tools' dciodvfy,
DCMTK's dsrdump, an independent rasteriser for the RTSTRUCT), and ``--keep-largest`` as part of the
model on every backend. The node applies the same gate and outputs in
tests/system/test_dicom_node_clinical.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("skimage")

import pydicom
from click.testing import CliRunner
from dicomnet import STUDY_OTHERS, contour_masks, dciodvfy_errors, need_tools, write_study

from attunet_deploy import load_runner
from attunet_deploy.apps.dicom.seg import referenced_masks
from attunet_deploy.cli import main
from attunet_deploy.demo.ctseries import SeriesGeometry, SeriesHeader, write_ct_series

DSRDUMP = "/usr/bin/dsrdump"
SOP = {"seg": "1.2.840.10008.5.1.4.1.1.66.4", "rtstruct": "1.2.840.10008.5.1.4.1.1.481.3",
       "sc": "1.2.840.10008.5.1.4.1.1.7", "sr": "1.2.840.10008.5.1.4.1.1.88.34"}


def predict(bundle: Path, *args: str) -> tuple[int, str, dict]:
    """attdeploy predict --dicom-seg ... --json -: (exit code, output, the JSON when exit 0)."""
    r = CliRunner().invoke(main, ["predict", "-b", str(bundle), "--dicom-seg", "--backend", "ort", "--json", "-",
                                  *args])
    data = {}
    if r.exit_code == 0:
        data = json.loads(r.stdout[r.stdout.index("{"):])
    return r.exit_code, r.output, data


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("study")
    return root, write_study(root)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# ------------------------------------------------------------------------------------------- the gate
def test_predict_refuses_each_other_series_of_a_study_by_its_rule_and_force_flags_them(demo_bundle: Path,
                                                                                      study: tuple, tmp_path: Path
                                                                                      ) -> None:
    root, slices = study
    code, out, _ = predict(demo_bundle, str(root), "-o", str(tmp_path / "refused"))
    assert code == 2 and out.count("\n") == 1 and "Traceback" not in out, out
    for name, rule in STUDY_OTHERS.items():
        uid = pydicom.dcmread(slices[name][0].path, stop_before_pixels=True).SeriesInstanceUID
        assert f"series {uid} refused by {rule}:" in out, (name, out)
    axial_uid = pydicom.dcmread(slices["axial"][0].path, stop_before_pixels=True).SeriesInstanceUID
    assert axial_uid not in out and not (tmp_path / "refused").exists()  # nothing written, nothing half-done

    code, out, data = predict(demo_bundle, str(root), "-o", str(tmp_path / "forced"), "--force")
    assert code == 0, out
    assert out.count("warning:") >= len(STUDY_OTHERS)
    qa = {row["series"]: row["qa"] for row in data["series"]}
    assert len(qa) == 5 and qa[axial_uid] == {"status": "ok", "reasons": []}
    for name, rule in STUDY_OTHERS.items():
        uid = pydicom.dcmread(slices[name][0].path, stop_before_pixels=True).SeriesInstanceUID
        assert qa[uid]["status"] == "review"
        assert any(f"acceptance gate refused it ({rule}:" in r for r in qa[uid]["reasons"]), qa[uid]

    code, out, data = predict(demo_bundle, str(root / "axial"), "-o", str(tmp_path / "axial"))
    assert code == 0 and [r["series"] for r in data["series"]] == [axial_uid], out


def test_a_rules_file_selects_by_description_regex_and_slice_thickness(demo_bundle: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"selections": [{"name": "abdomen, 2 mm or thicker", "conditions": {
        "Modality": "CT", "SeriesDescription": "(?i)^abdomen\\b", "SliceThickness": ">=2"}}]}))
    for name, thickness, description in (("thick", 2.5, "Abdomen 2.5mm"), ("thin", 1.0, "Abdomen 1mm"),
                                         ("chest", 2.5, "Chest 2.5mm")):
        write_ct_series(tmp_path / "in" / name, 6, (96, 96), header=SeriesHeader(series_description=description),
                        geometry=SeriesGeometry(spacing=thickness))
    code, out, _ = predict(demo_bundle, str(tmp_path / "in"), "-o", str(tmp_path / "o1"), "--accept", str(rules))
    assert code == 2 and out.count("refused by accept-rules") == 2, out
    assert "SliceThickness 1.0 is not >=2" in out and "'Chest 2.5mm' does not match" in out
    code, out, data = predict(demo_bundle, str(tmp_path / "in" / "thick"), "-o", str(tmp_path / "o2"),
                              "--accept", str(rules))
    assert code == 0 and len(data["series"]) == 1, out
    # without rules, the built-in defaults take all three (axial, primary, enough slices)
    code, out, data = predict(demo_bundle, str(tmp_path / "in"), "-o", str(tmp_path / "o3"))
    assert code == 0 and len(data["series"]) == 3, out


# ------------------------------------------------------------------------------------------- QA flag
def test_qa_flags_series_unlike_the_verified_images_and_passes_the_demo_series(demo_bundle: Path,
                                                                              tmp_path: Path) -> None:
    from attunet_deploy.demo import make_phantoms

    hu, _ = make_phantoms(12, seed=77, size=(128, 128))
    write_ct_series(tmp_path / "demo", 12, (128, 128), volume=hu[:, 0])
    write_ct_series(tmp_path / "thick", 12, (128, 128), volume=hu[:, 0], geometry=SeriesGeometry(spacing=10.0))
    write_ct_series(tmp_path / "shifted", 12, (128, 128), volume=hu[:, 0] + 1000.0)
    qa = {}
    for name in ("demo", "thick", "shifted"):
        code, out, data = predict(demo_bundle, str(tmp_path / name), "-o", str(tmp_path / f"out-{name}"))
        assert code == 0, out
        qa[name] = data["series"][0]["qa"]
    assert qa["demo"] == {"status": "ok", "reasons": []}
    assert qa["thick"]["status"] == "review"
    assert any("slice thickness 10 mm is outside the 2.5 mm verified" in r for r in qa["thick"]["reasons"])
    assert qa["shifted"]["status"] == "review"
    assert any(r.startswith("intensity 1st percentile") for r in qa["shifted"]["reasons"]), qa["shifted"]


# ------------------------------------------------------------------------------------------- outputs
def sr_volumes(path: Path) -> list[float]:
    """The volumes (ml) DCMTK's dsrdump reads from an SR."""
    text = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return [float(v) for v in re.findall(r'\(\w*,\w*,"Volume"\)="([-0-9.eE+]+)" \(ml,UCUM', text)]


def test_seg_rtstruct_overlay_and_sr_are_valid_and_agree_with_the_masks(demo_bundle: Path, study: tuple,
                                                                        tmp_path: Path) -> None:
    need_tools("dciodvfy")
    if not Path(DSRDUMP).is_file():
        pytest.skip(f"{DSRDUMP} missing: apt-get install -y dcmtk")
    root, slices = study
    code, out, data = predict(demo_bundle, str(root / "axial"), "-o", str(tmp_path / "o"), "--outputs",
                              "seg,rtstruct,sc,sr")
    assert code == 0, out
    (row,) = data["series"]
    files = [Path(p) for p in row["outputs"]]
    by_kind: dict[str, list[Path]] = {}
    for f in files:
        by_kind.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID), []).append(f)
    assert set(by_kind) == set(SOP.values())
    for f in files:
        assert dciodvfy_errors(f) == [], f
    (seg,) = by_kind[SOP["seg"]]
    axial = slices["axial"]
    masks = referenced_masks(seg, [s.sop_instance_uid for s in axial])
    with load_runner(demo_bundle, backend="ort") as runner:
        np.testing.assert_array_equal(masks, np.stack([runner.segment(s.hu[None, None])[0] for s in axial]))
    # the SEG's colour and who made it
    ds = pydicom.dcmread(seg)
    assert len(ds.SegmentSequence[0].RecommendedDisplayCIELabValue) == 3
    (ours,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "attunet-deploy"]
    assert ours.ManufacturerModelName and ours.SoftwareVersions and ours.PurposeOfReferenceCodeSequence[0].CodeValue \
        == "109102" and "bundle manifest sha256" in ours.ContributionDescription
    # SC: one overlay per slice with a segment, each referencing its source slice
    with_segment = {axial[i].sop_instance_uid for i in range(len(axial)) if masks[i].any()}
    sc = by_kind[SOP["sc"]]
    assert {pydicom.dcmread(f).SourceImageSequence[0].ReferencedSOPInstanceUID for f in sc} == with_segment
    # SR: the volume of the segment, voxel count x voxel volume (1 x 1 x 2.5 mm), within 0.1 %
    (sr,) = by_kind[SOP["sr"]]
    expected = float((masks == 1).sum()) * 1.0 * 1.0 * 2.5 / 1000.0
    (volume,) = sr_volumes(sr)
    assert volume == pytest.approx(expected, rel=1e-3) and expected > 0
    # RTSTRUCT: its contours rasterised back independently match the mask
    (rt,) = by_kind[SOP["rtstruct"]]
    filled = contour_masks(rt, axial, 1)
    checked = [dice(filled[k], masks[k] == 1) for k in range(len(axial)) if (masks[k] == 1).sum() >= 50]
    assert checked and min(checked) >= 0.97, checked


@pytest.fixture(scope="module")
def bundle3d(demo3d_bundle: Path) -> Path:
    return demo3d_bundle


def test_rtstruct_round_trip_on_the_3d_demo_series(bundle3d: Path, tmp_path: Path) -> None:
    need_tools("dciodvfy")
    from attunet_deploy.demo.phantom3d import make_volume

    hu, _ = make_volume(4243, (40, 96, 96))
    axial = write_ct_series(tmp_path / "ct", volume=hu, geometry=SeriesGeometry(spacing=2.5, pixel_spacing=3.0))
    code, out, data = predict(bundle3d, str(tmp_path / "ct"), "-o", str(tmp_path / "o"), "--outputs", "seg,rtstruct")
    assert code == 0, out
    seg, rt = (Path(p) for p in data["series"][0]["outputs"])
    masks = referenced_masks(seg, [s.sop_instance_uid for s in axial])
    assert dciodvfy_errors(rt) == []
    for cls in np.unique(masks[masks > 0]):
        filled = contour_masks(rt, axial, int(cls))
        checked = [dice(filled[k], masks[k] == cls) for k in range(len(axial)) if (masks[k] == cls).sum() >= 50]
        assert checked and min(checked) >= 0.97, (cls, checked)


# ------------------------------------------------------------------------------------------- keep-largest
def test_keep_largest_removes_an_island_identically_on_ort_and_ov_and_verify_compares_cleaned_masks(
        tmp_path: Path) -> None:
    from dataclasses import replace

    from attunet_deploy.bundle import Bundle
    from attunet_deploy.components import count
    from attunet_deploy.demo import make_phantoms
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.results import Tolerance
    from attunet_deploy.judge.verify import compare
    from attunet_deploy.segmenter import Segmenter

    out = tmp_path / "kl"
    r = CliRunner().invoke(main, ["export", "-o", str(out), "--keep-largest"])
    assert r.exit_code == 0, r.output[-2000:]
    bundle = Bundle.load(out)
    post = bundle.spec.postprocessing
    assert post.keep_largest == (1,) and bundle.manifest_copy()["postprocessing"]["keep_largest"] == [1]
    segmenter = Segmenter(bundle.spec)
    hu, _ = make_phantoms(2, seed=31, size=(128, 128))
    two = np.concatenate([hu[0], hu[1]], axis=-1)[None]  # two bodies side by side: the organ twice
    with load_runner(out, backend="ort") as ort, load_runner(out, backend="ov") as ov:
        masks_ort, masks_ov = ort.segment(two), ov.segment(two)
        logits = ort.infer(segmenter.prepare(two))
    before = segmenter.masks(logits, replace(post, keep_largest=()))
    assert count(before[0], [1])[1] >= 2  # the island is there before the clean-up...
    np.testing.assert_array_equal(masks_ort, masks_ov)  # ...and gone, identically, on both backends
    assert count(masks_ort[0], [1]) == {1: 1} and 0 < (masks_ort == 1).sum() < (before == 1).sum()

    # verify compares the cleaned masks on both sides: an island in a backend's output is no deviation
    cases = load_golden(bundle)
    island = [c.logits.copy() for c in cases]
    island[0][0, -1, 1:5, 1:5] = 30.0  # a confident foreground island in a corner of the first image
    tol = Tolerance(mean_dice=0.999)
    assert compare(island, cases, segmenter, tol).agreement.flipped_pixels == 0
    plain = Segmenter(replace(bundle.spec, postprocessing=replace(post, keep_largest=())))
    assert compare(island, cases, plain, tol).agreement.flipped_pixels == 16


# ------------------------------------------------------------------------------------------- bad input
BAD_RULES = {
    "malformed": "{\"selections\": [",
    "unknown key": json.dumps({"selections": [{"name": "a", "conditions": {"SeriesDescrption": "abd"}}]}),
    "bad regex": json.dumps({"selections": [{"name": "a", "conditions": {"SeriesDescription": "abd(omen"}}]}),
}


@pytest.mark.parametrize("command", ["predict", "serve-dicom"])
@pytest.mark.parametrize("fault", [*BAD_RULES, "unknown output"])
def test_bad_rules_and_outputs_are_one_line_and_exit_2(demo_bundle: Path, study: tuple, tmp_path: Path,
                                                        command: str, fault: str) -> None:
    root, _ = study
    rules = tmp_path / "rules.json"
    rules.write_text(BAD_RULES.get(fault, "{}"))
    extra = ["--outputs", "seg,pdf"] if fault == "unknown output" else ["--accept", str(rules)]
    args = [str(root), "--dicom-seg", "-o", str(tmp_path / "o")] if command == "predict" else \
        ["--out", str(tmp_path / "node"), "--port", "11112", "--bind", "127.0.0.1"]
    r = CliRunner().invoke(main, [command, "-b", str(demo_bundle), *args, *extra])
    assert r.exit_code == 2 and r.output.startswith("error:") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output and ("--outputs" if fault == "unknown output" else "--accept") in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "node" / "seg").exists()


def test_a_colour_that_is_not_rgb_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "b"), "--segment", "1=Organ#12345G"])
    (error,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]  # after the checkpoint's progress line
    assert r.exit_code == 2 and "#RRGGBB" in error and error.startswith("error: --segment:") and "Traceback" not in \
        r.output
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- input profile
def test_quantize_widens_the_input_profile_with_the_calibration_images(bundle_copy: Path, tmp_path: Path) -> None:
    from attunet_deploy.bundle import Bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    before = Bundle.load(bundle_copy).input_profile
    write_ct_series(tmp_path / "calib", 8, (96, 96), geometry=SeriesGeometry(spacing=1.25, pixel_spacing=0.7))
    settings = QuantizeSettings(precisions=("int8",), calib=str(tmp_path / "calib"), verify=False)
    quantize_bundle(Bundle.load(bundle_copy), settings)
    after = Bundle.load(bundle_copy).input_profile
    assert after.images == before.images + 8 and "8 calibration images" in after.source
    assert after.pixel_spacing_mm is not None and after.pixel_spacing_mm[0] == pytest.approx(0.7)
    assert after.slice_thickness_mm is not None and after.slice_thickness_mm[0] == pytest.approx(1.25)
    assert after.p1 is not None and after.p99 is not None and after.p1[0] < -900 < 200 < after.p99[1]
    quantize_bundle(Bundle.load(bundle_copy), settings)  # the same set again: counted once
    assert Bundle.load(bundle_copy).input_profile.images == after.images
