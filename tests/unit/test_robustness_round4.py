"""Robustness round 4 (issue 34), the cases that need no model: limit variables parsed by one
function, DICOM text checked for its VR and written with the right character set, slice geometry
and spacings held to physical ranges, headers' claimed sizes checked against the file, and windows
and volumes whose sliding-window pass would not fit memory refused before any allocation.
Each test names the case of the issue it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attunet_deploy import limits
from attunet_deploy.bundle.spec import SlidingWindow
from attunet_deploy.dicomtext import check_dicom_text
from attunet_deploy.errors import InputError
from attunet_deploy.window import check_window_memory, sliding_window


# ------------------------------------------------------------------ 3. limit variables
@pytest.mark.parametrize("raw, says", [
    ("1e308", "no larger than"),  # was OverflowError, exit 3
    ("inf", "no larger than"), ("nan", "no larger than"), ("-1", "positive"), ("0", "positive"),
    ("lots", "not a number"),
])
def test_every_limit_variable_is_parsed_by_one_function_naming_it(monkeypatch: pytest.MonkeyPatch, raw: str,
                                                                  says: str) -> None:
    for lim in (limits.CHECKPOINT, limits.IMAGE_PIXELS, limits.VERIFY_IMAGES, limits.JSON_DEPTH, limits.WINDOW):
        monkeypatch.setenv(lim.env, raw)
        with pytest.raises(InputError, match=says) as err:
            lim.bytes()
        assert lim.env in str(err.value)


def test_counts_must_be_whole_and_sizes_may_be_fractional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(limits.VERIFY_IMAGES.env, "0.5")  # was exit 3 further on
    with pytest.raises(InputError, match="whole number"):
        limits.VERIFY_IMAGES.bytes()
    monkeypatch.setenv(limits.HELD_IMAGES.env, "0.5")
    assert limits.HELD_IMAGES.bytes() == 2**19
    monkeypatch.setenv(limits.CHECKPOINT.env, str(2**24))  # the ceiling itself: an exact integer of bytes
    assert limits.CHECKPOINT.bytes() == 2**44


# ------------------------------------------------------------------ 4. DICOM text
@pytest.mark.parametrize("text, says", [
    ("a\\b", "backslash"), ("x" * 70, "70 characters"), ("Liver\x07", "control characters"),
    ("Liver\nSpleen", "control characters"), ("   ", "empty"),
])
def test_dicom_text_is_checked_for_its_vr_when_the_option_is_parsed(text: str, says: str) -> None:
    with pytest.raises(InputError, match=says) as err:
        check_dicom_text(text, "segment label", field="segment_label")
    assert err.value.field == "segment_label"


def test_non_ascii_text_is_allowed_and_declared_as_utf8() -> None:
    pydicom = pytest.importorskip("pydicom")
    from attunet_deploy.apps.dicom.seg import declare_charset

    label = check_dicom_text("膵臓 Bauchspeicheldrüse", "segment label")
    ds = pydicom.Dataset()
    ds.PatientName = "Doe^John"
    seq = pydicom.Dataset()
    seq.SegmentLabel = label
    ds.SegmentSequence = [seq]
    declare_charset(ds)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    plain = pydicom.Dataset()
    plain.PatientName = "Doe^John"
    declare_charset(plain)
    assert "SpecificCharacterSet" not in plain


# ------------------------------------------------------------------ 5. geometry
def _instance(orientation: tuple[float, ...], spacing: tuple[float, float] | None = (0.7, 0.7)) -> object:
    from attunet_deploy.io.dicom import Instance

    return Instance(path=Path("x.dcm"), sop_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    series_uid="1.2", study_uid="1.2.9", modality="CT", rows=64, columns=64, position=(0.0, 0.0, 0.0),
                    orientation=orientation, instance_number=1, has_pixels=True, pixel_spacing=spacing)


@pytest.mark.parametrize("orientation, spacing, says", [
    ((2, 0, 0, 0, 2, 0), (0.7, 0.7), "lengths 2 and 2, not 1"),  # was read as spacing (20, 6, 6) and a SEG written
    ((1, 0, 0, 0.6, 0.8, 0), (0.7, 0.7), "53.1 degrees apart, not 90"),  # was "gantry tilt 36.9"
    ((1, 0, 0, 0, 1, 0), (1e308, 1e308), "outside 0.01-50 mm"),  # was exit 3
    ((1, 0, 0, 0, 1, 0), (0.001, 0.001), "outside 0.01-50 mm"),
])
def test_orientation_must_be_two_orthogonal_unit_vectors_and_spacing_physical(orientation: tuple, spacing: tuple,
                                                                               says: str) -> None:
    pytest.importorskip("pydicom")
    from attunet_deploy.io.dicom_series import geometry_problem

    problem = geometry_problem(_instance(tuple(float(v) for v in orientation), spacing))  # type: ignore[arg-type]
    assert problem is not None and says in problem
    assert geometry_problem(_instance((1.0, 0.0, 0.0, 0.0, 0.999999, 0.001))) is None  # 6-decimal cosines pass  # type: ignore[arg-type]


def test_slices_far_apart_are_refused_before_a_volume_is_built() -> None:
    pytest.importorskip("pydicom")
    from dataclasses import replace

    from attunet_deploy.io.dicom_series import series_spacing

    base = _instance((1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    far = [replace(base, position=(0.0, 0.0, 1000.0 * k), sop_instance_uid=f"1.2.3.{k}") for k in range(8)]  # type: ignore[type-var]
    with pytest.raises(InputError, match=r"1000 mm apart, outside 0\.1-50 mm"):  # was minutes of resampling
        series_spacing(far)  # type: ignore[arg-type]


# ------------------------------------------------------------------ 6. memory bounded by the input
def test_a_nifti_header_claiming_more_than_the_file_holds_is_refused_before_allocation(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    from attunet_deploy.io.volumes import read_volume

    header = nib.Nifti1Header()
    header.set_data_shape((500, 500, 500))
    header.set_data_dtype(np.float64)
    path = tmp_path / "liar.nii"
    path.write_bytes(header.binaryblock + b"\0" * 64)  # 416 bytes claiming 1 GB of voxels
    with pytest.raises(InputError, match="claims 1,000,000,000 bytes of voxels but the file holds"):
        read_volume(path, 1)


def test_a_nifti_with_infinite_pixdim_is_refused_with_the_axis(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    from attunet_deploy.io.volumes import read_volume

    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, np.inf, 2.0]
    nib.save(img, tmp_path / "inf.nii")
    with pytest.raises(InputError, match="along y is inf mm"):
        read_volume(tmp_path / "inf.nii", 1)


@pytest.mark.parametrize("roi, says", [((4096, 4096, 4096), "each axis at most 512"),
                                       ((512, 512, 512), "use a smaller --roi")])
def test_a_window_too_large_for_memory_is_refused_at_export(roi: tuple, says: str) -> None:
    with pytest.raises(InputError, match=says) as err:
        SlidingWindow(roi)
    assert err.value.field == "roi"


def test_padding_a_thin_volume_up_to_the_window_is_refused_before_allocation() -> None:
    window = SlidingWindow((32, 64, 64))
    calls = []
    with pytest.raises(InputError, match="much smaller than the 32x64x64 window"):
        sliding_window(lambda w: calls.append(w) or w, np.zeros((1, 1, 1, 300000, 1), np.float32), window)
    assert not calls  # refused before the first window ran
    check_window_memory((1, 1, 40, 512, 512), window)  # a real CT volume passes


def test_a_volume_beyond_the_window_memory_limit_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(limits.WINDOW.env, "64")
    with pytest.raises(InputError, match="ATTDEPLOY_MAX_WINDOW_MB"):
        check_window_memory((1, 1, 100, 512, 512), SlidingWindow((32, 64, 64)))


# ------------------------------------------------------------------ --max-dice-drop 0
def test_an_accuracy_aware_search_that_ends_all_float_is_exit_1_unless_allowed(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    """Our search logic with stand-ins for the quantiser and the evaluation: Dice reaches 1.0 only
    when every convolution is back in float (what --max-dice-drop 0 does on a real model)."""
    import json

    from attunet_deploy.build import int8_search
    from attunet_deploy.errors import VerificationFailed

    convs = ["conv_a", "conv_b", "conv_c"]

    def fake_quantize(src: Path, dst: Path, extra_float: tuple[str, ...] | list[str] = (), **kw: object) -> dict:
        Path(dst).write_text(json.dumps(sorted(extra_float)))
        return {"float_nodes": list(extra_float)}

    def evaluate(path: Path) -> tuple[float, float]:
        n = len(json.loads(Path(path).read_text()))
        return (1.0 if n == len(convs) else 0.97 + 0.01 * n), 1.0

    monkeypatch.setattr(int8_search, "quantize_int8", fake_quantize)
    monkeypatch.setattr(int8_search, "revert_units", lambda dst: [(c,) for c in convs])
    kw = {"method": "percentile", "target": 1.0, "evaluate": evaluate}
    with pytest.raises(VerificationFailed, match="every one of the 3 convolutions in float"):  # was exit 0
        int8_search.accuracy_aware_int8(tmp_path / "src.onnx", tmp_path / "int8.onnx", None, **kw)  # type: ignore[arg-type]
    record = int8_search.accuracy_aware_int8(tmp_path / "src.onnx", tmp_path / "int8.onnx", None, allow_float=True,
                                             **kw)  # type: ignore[arg-type]
    assert record["accuracy_aware"]["reverted"] == convs
    partial = int8_search.accuracy_aware_int8(tmp_path / "src.onnx", tmp_path / "int8.onnx", None, method="percentile",
                                              target=0.985, evaluate=evaluate)
    assert len(partial["accuracy_aware"]["reverted"]) == 2  # a reachable target keeps some INT8: no refusal
