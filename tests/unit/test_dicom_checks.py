"""The DICOM node's receipt checks as functions (numpy + pydicom only, fast lane)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.uid import ExplicitVRLittleEndian, RLELossless  # noqa: E402

from attunet_deploy.apps.dicom.checks import is_valid_uid, pixel_problem, uid_problem  # noqa: E402
from attunet_deploy.io.dicom import CT_IMAGE_STORAGE  # noqa: E402


@pytest.mark.parametrize(("uid", "ok"), [
    ("1.2.840.10008.5.1.4.1.1.2", True), ("0.1", True), ("1.0.2", True), ("1.2." + "3" * 60, True),
    (".", False), ("..", False), ("", False), ("1..2", False), ("1.02.3", False), ("1.2.3a", False),
    ("1.2/3", False), ("1.2." + "3" * 61, False), ("1", False), ("1.2.", False), (" 1.2", False),
])
def test_uid_rule(uid: str, ok: bool) -> None:
    assert is_valid_uid(uid) is ok


def _ct(rows: int = 4, cols: int = 5, bits: int = 16) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3"
    ds.StudyInstanceUID = "1.2"
    ds.FrameOfReferenceUID = "1.2.9"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((rows, cols), np.int16 if bits == 16 else np.uint8).tobytes()
    return ds


def test_uid_problems_and_statuses() -> None:
    ds = _ct()
    assert uid_problem(ds, CT_IMAGE_STORAGE, "1.2.3.4") is None
    assert uid_problem(ds, CT_IMAGE_STORAGE, "1.2.3.5")[0] == 0xA900  # dataset differs from the request
    assert uid_problem(ds, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4")[0] == 0xA900
    assert uid_problem(ds, CT_IMAGE_STORAGE, "1.2.3.4a")[0] == 0xC000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = ".."
    status, reason = uid_problem(ds, CT_IMAGE_STORAGE, "1.2.3.4")
    assert status == 0xC000 and "SeriesInstanceUID" in reason
    ds = _ct()
    del ds.FrameOfReferenceUID
    assert "FrameOfReferenceUID" in uid_problem(ds, CT_IMAGE_STORAGE, "1.2.3.4")[1]


@pytest.mark.parametrize(("change", "match"), [
    (lambda d: setattr(d, "PixelData", d.PixelData[:-2]), "disagree"),
    (lambda d: setattr(d, "PixelData", b""), "disagree"),
    (lambda d: (setattr(d, "BitsAllocated", 32), setattr(d, "BitsStored", 32)), "BitsAllocated 32"),
    (lambda d: setattr(d, "Rows", 8), "disagree"),
    (lambda d: setattr(d, "SamplesPerPixel", 3), "SamplesPerPixel"),
    (lambda d: setattr(d, "BitsStored", 17), "BitsStored"),
    (lambda d: setattr(d, "PixelRepresentation", 2), "PixelRepresentation"),
    (lambda d: setattr(d, "NumberOfFrames", 2), "NumberOfFrames"),
    (lambda d: setattr(d, "PhotometricInterpretation", "RGB"), "PhotometricInterpretation"),
    (lambda d: delattr(d, "PixelData"), "no pixel data"),
    (lambda d: setattr(d, "Rows", 0), "Rows"),
])
def test_pixel_problems(change, match: str) -> None:
    ds = _ct()
    assert pixel_problem(ds, ExplicitVRLittleEndian, 10**6) is None
    change(ds)
    reason = pixel_problem(ds, ExplicitVRLittleEndian, 10**6)
    assert reason is not None and match in reason


def test_pixel_limit_and_odd_length_padding() -> None:
    assert "above the limit" in pixel_problem(_ct(), ExplicitVRLittleEndian, 10)
    ds = _ct(3, 3, bits=8)
    ds.PixelData = ds.PixelData + b"\0"  # 9 bytes padded to an even 10: valid
    assert pixel_problem(ds, ExplicitVRLittleEndian, 10**6) is None


def test_encapsulated_pixel_data_is_decoded_on_receipt() -> None:
    from pydicom.encaps import encapsulate

    ds = _ct()
    ds.PixelData = encapsulate([b"\x00" * 10])  # not an RLE stream
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    assert "cannot decode" in pixel_problem(ds, RLELossless, 10**6)


def test_ct_image_storage_is_pydicoms_uid() -> None:
    """The literal kept in io.dicom (importable without pydicom) is pydicom's CT Image Storage."""
    from pydicom.uid import CTImageStorage

    assert CTImageStorage == CT_IMAGE_STORAGE
