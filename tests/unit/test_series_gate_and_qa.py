"""The clinical layer's logic on plain headers and arrays (no model, no network): the series
acceptance gate (rules in MONAI Deploy's selection format and the built-in defaults), the QA flag
against an input profile, connected-component cleanup, and the one-line errors for bad rules,
outputs and colours. The node and ``predict`` apply the same gate end to end in
tests/integration/test_clinical_outputs.py and tests/system/test_dicom_node_clinical.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from attunet_deploy.apps.dicom.gate import Condition, Gate, SeriesFacts, load_rules  # noqa: E402
from attunet_deploy.apps.dicom.outputs import parse_outputs  # noqa: E402
from attunet_deploy.bundle.profile import InputProfile  # noqa: E402
from attunet_deploy.bundle.spec import Postprocessing  # noqa: E402
from attunet_deploy.components import clean, count  # noqa: E402
from attunet_deploy.errors import InputError  # noqa: E402
from attunet_deploy.preprocess import parse_segments  # noqa: E402
from attunet_deploy.qa import MaskTally, SeriesFeatures, assess, input_reasons  # noqa: E402

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]


def header(image_type: str = "ORIGINAL\\PRIMARY\\AXIAL", description: str = "Abdomen 2.5mm",
           orientation: list[float] | None = None, thickness: float = 2.5, modality: str = "CT") -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = modality
    ds.ImageType = image_type.split("\\")
    ds.SeriesDescription = description
    ds.ImageOrientationPatient = orientation if orientation is not None else AXIAL
    ds.SliceThickness = thickness
    return ds


def facts(slices: int = 40, **kw: object) -> SeriesFacts:
    return SeriesFacts.of(header(**kw), slices)  # type: ignore[arg-type]


def tilted(deg: float) -> list[float]:
    """Axial slices tilted about the x axis by ``deg`` (a gantry tilt)."""
    r = math.radians(deg)
    return [1, 0, 0, 0, math.cos(r), math.sin(r)]


def rules(tmp_path: Path, body: object) -> Path:
    p = tmp_path / "rules.json"
    p.write_text(body if isinstance(body, str) else json.dumps(body))
    return p


# ---------------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("kw, rule", [
    ({"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}, "localizer"),
    ({"image_type": "DERIVED\\SECONDARY\\AXIAL"}, "derived"),
    ({"image_type": "ORIGINAL\\SECONDARY"}, "derived"),
    ({"description": "Abdomen MIP 10mm"}, "mip"),
    ({"orientation": CORONAL}, "orientation"),
    ({"orientation": tilted(15)}, "orientation"),
])
def test_defaults_refuse_what_a_scanner_pushes_beside_the_axial_series_and_name_the_rule(kw: dict, rule: str
                                                                                          ) -> None:
    v = Gate().decide(facts(**kw))
    assert not v.accepted and v.rule == rule and v.reason


def test_defaults_accept_axial_ct_and_a_small_gantry_tilt() -> None:
    assert Gate().decide(facts()).accepted
    assert Gate().decide(facts(orientation=tilted(8))).accepted  # within 10 degrees
    assert facts(orientation=tilted(8)).degrees_off("axial") == pytest.approx(8, abs=1e-6)


def test_defaults_refuse_too_few_slices_in_the_series_own_spacing_for_a_3d_window() -> None:
    assert Gate().decide(facts(slices=1)).rule == "slices"
    gate = Gate(min_slices=16)  # a 3D window 32 voxels deep at 1.5 mm: 16 voxels = 24 mm
    assert not gate.decide(facts(slices=9), 1.5, 2.5).accepted  # 9 x 2.5 mm < 24 mm: needs 10
    assert gate.decide(facts(slices=10), 1.5, 2.5).accepted
    assert gate.decide(facts(slices=16), 1.5, 1.5).accepted and not gate.decide(facts(slices=15), 1.5, 1.5).accepted


# ---------------------------------------------------------------------------------------------- rules
def test_rules_select_by_description_regex_thickness_comparison_and_image_type(tmp_path: Path) -> None:
    gate = Gate(load_rules(rules(tmp_path, {"selections": [{"name": "abdomen", "conditions": {
        "Modality": "ct", "ImageType": ["primary", "AXIAL"], "SeriesDescription": "(?i)abd(omen)?\\b",
        "SliceThickness": ">=2", "orientation": "axial"}}]})))
    assert gate.decide(facts()).accepted  # "ct" equals "CT" ignoring case; regex found in the description
    thin = gate.decide(facts(thickness=1.0))
    assert not thin.accepted and thin.rule == "accept-rules" and "SliceThickness 1.0 is not >=2" in thin.reason
    assert "lacks primary" in gate.decide(facts(image_type="ORIGINAL\\SECONDARY\\AXIAL")).reason
    assert "does not match" in gate.decide(facts(description="Chest")).reason
    assert not gate.decide(facts(modality="MR")).accepted
    assert not gate.decide(facts(orientation=CORONAL)).accepted


def test_a_series_meeting_any_one_selection_is_accepted_and_numbers_compare_exactly(tmp_path: Path) -> None:
    gate = Gate(load_rules(rules(tmp_path, {"selections": [
        {"name": "thick", "conditions": {"SliceThickness": 5}},
        {"name": "many", "conditions": {"slices": ">100"}}]})))
    assert gate.decide(facts(thickness=5.0)).accepted
    assert gate.decide(facts(slices=101)).accepted
    refused = gate.decide(facts(thickness=2.5, slices=40))
    assert not refused.accepted and "'thick'" in refused.reason and "'many'" in refused.reason


def test_a_missing_attribute_fails_a_condition_rather_than_matching() -> None:
    cond = Condition.parse("ProtocolName", "abdo", "rules")
    assert cond.fails(facts()) == "has no ProtocolName"


@pytest.mark.parametrize("body, says", [
    ("{not json", "is not JSON"),
    ({"selections": []}, "expected"),
    ([1, 2], "expected"),
    ({"selections": [{"name": "x"}]}, "non-empty \"conditions\""),
    ({"selections": [{"name": "x", "conditions": {"NoSuchKeyword": "CT"}}]}, "unknown condition key 'NoSuchKeyword'"),
    ({"selections": [{"name": "x", "conditions": {"SeriesDescription": "abd(omen"}}]}, "not a regular expression"),
    ({"selections": [{"name": "x", "conditions": {"orientation": "oblique"}}]}, "orientation must be"),
    ({"selections": [{"name": "x", "conditions": {"ImageType": []}}]}, "non-empty list of strings"),
    ({"selections": [{"name": "x", "conditions": {"Modality": True}}]}, "must be a string"),
    ({"selections": [{"name": "x", "conditions": {"Modality": "CT"}, "priority": 1}]}, "unknown field(s) priority"),
])
def test_bad_rules_files_are_one_line_input_errors_naming_the_fault(tmp_path: Path, body: object, says: str) -> None:
    with pytest.raises(InputError) as err:
        load_rules(rules(tmp_path, body))
    assert says in str(err.value) and "\n" not in str(err.value) and err.value.field == "accept"


# ---------------------------------------------------------------------------------------------- QA
PROFILE = InputProfile(images=12, pixel_spacing_mm=(0.7, 0.9), slice_thickness_mm=(2.5, 2.5), fov_mm=(350, 460),
                       p1=(-1020, -990), p50=(-120, 40), p99=(180, 420), segment_size={1: (200.0, 900.0)},
                       size_unit="mm2", components_max=1, source="test")


def test_qa_flags_thick_slices_and_shifted_intensities_and_passes_a_series_like_the_verified_ones() -> None:
    like = SeriesFeatures(pixel_spacing=(0.8, 0.8), slice_thickness=2.5, fov_mm=410, p1=-1000, p50=-40, p99=300)
    assert input_reasons(PROFILE, like) == []
    thick = input_reasons(PROFILE, SeriesFeatures(pixel_spacing=(0.8, 0.8), slice_thickness=10.0, fov_mm=410,
                                                  p1=-1000, p50=-40, p99=300))
    assert len(thick) == 1 and "slice thickness 10 mm is outside the 2.5 mm verified" in thick[0]
    shifted = input_reasons(PROFILE, SeriesFeatures(pixel_spacing=(0.8, 0.8), slice_thickness=2.5, fov_mm=410,
                                                    p1=0, p50=960, p99=1300))
    assert len(shifted) == 2 and all("intensity" in r for r in shifted)
    assert input_reasons(InputProfile(), thick and like) == []  # nothing recorded: nothing to compare with


def test_qa_flags_fragments_and_a_segment_size_never_seen_but_not_the_expected_mask() -> None:
    labels = {1: "Organ"}
    f = SeriesFeatures(pixel_spacing=(1.0, 1.0), slice_thickness=2.5, voxel_mm3=1.0)
    one = np.zeros((2, 64, 64), np.uint8)
    one[:, 10:30, 10:30] = 1  # 400 mm² per slice, one piece
    assert assess(PROFILE, f, one, None, labels).status == "ok"
    pieces = one.copy()
    for k in range(5):
        pieces[0, 40:42, 4 + 8 * k: 6 + 8 * k] = 1
    qa = assess(PROFILE, f, pieces, None, labels)
    assert qa.status == "review" and any("6 pieces (at most 4 expected)" in r for r in qa.reasons)
    big = np.ones((2, 64, 64), np.uint8)  # 4096 mm² > 900 x 3
    assert any("outside the 200-900 mm2" in r for r in assess(PROFILE, f, big, None, labels).reasons)


def test_the_uncertainty_tally_counts_voxels_near_the_decision_and_flags_above_the_share() -> None:
    tally = MaskTally(Postprocessing("sigmoid_threshold", 0.5))
    logits = np.full((1, 1, 10, 10), 4.0, np.float32)  # p = 0.98: sure foreground
    logits[0, 0, :3] = 0.2  # p = 0.55: uncertain
    logits[0, 0, 9] = -6.0  # sure background
    tally.add(logits)
    assert (tally.foreground, tally.uncertain, tally.region) == (90, 30, 90)
    assert tally.share == pytest.approx(1 / 3)
    qa = assess(PROFILE, SeriesFeatures(), np.zeros((1, 10, 10), np.uint8), tally, {1: "Organ"})
    assert qa.status == "review" and "33% of the segmented region is uncertain" in qa.reasons[0]
    softmax = MaskTally(Postprocessing("argmax"))
    z = np.zeros((1, 3, 4, 4), np.float32)
    z[0, 1] = 5.0  # class 1 sure everywhere...
    z[0, 2, 0] = 5.0  # ...but tied with class 2 on one row
    softmax.add(z)
    assert (softmax.foreground, softmax.uncertain) == (16, 4)


# ---------------------------------------------------------------------------------------------- cleanup
def test_keep_largest_and_min_size_drop_islands_per_class_without_touching_the_input() -> None:
    m = np.zeros((32, 32), np.uint8)
    m[2:12, 2:12] = 1  # 100 px
    m[20:23, 20:23] = 1  # island, 9 px
    m[25:30, 2:10] = 2  # 40 px
    m[0, 31] = 2  # island, 1 px
    kept = clean(m, [1, 2], keep_largest=[1])
    assert count(kept, [1, 2]) == {1: 1, 2: 2} and (kept == 1).sum() == 100 and (m == 1).sum() == 109
    small = clean(m, [1, 2], keep_largest=[], min_voxels=10)
    assert count(small, [1, 2]) == {1: 1, 2: 1} and (small == 2).sum() == 40
    vol = np.zeros((4, 8, 8), np.uint8)
    vol[0, 0, 0] = 1
    vol[1:4, 4:8, 4:8] = 1  # 6-connectivity in 3D: the corner voxel is its own component
    assert count(clean(vol, [1], keep_largest=[1]), [1]) == {1: 1} and clean(vol, [1], [1])[0, 0, 0] == 0


# ---------------------------------------------------------------------------------------------- options
def test_outputs_and_colours_are_checked_with_one_line_errors() -> None:
    assert parse_outputs("sr, SEG,rtstruct") == ("seg", "rtstruct", "sr")
    for bad, says in (("seg,pdf", "'pdf'"), ("", "'none'"), ("sr", "add seg")):
        with pytest.raises(InputError, match=says) as err:
            parse_outputs(bad)
        assert err.value.field == "outputs"
    seg = parse_segments(["1=Pancreas@SCT:15776009:Pancreas#E6A000"], 2)
    assert seg[0].color == (230, 160, 0)
    for bad in ("1=Pancreas#E6A0", "1=Pancreas#GGGGGG", "1=Pancreas#E6A000FF"):
        with pytest.raises(InputError, match="#RRGGBB"):
            parse_segments([bad], 2)
