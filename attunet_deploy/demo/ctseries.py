"""Synthetic CT series as DICOM files: phantom slices stored the way scanners store them.

Each slice is a CT Image Storage instance, int16 pixels with RescaleIntercept -1024 and
RescaleSlope 1 (stored value = HU + 1024), positioned along z. Used by the tests, the DICOM
node benchmark and ``attdeploy demo-series`` (the README's "Try it" walk-through); needs pydicom
(``attunet-deploy[dicom]``).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.demo.phantom import make_phantom

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass
class SeriesSlice:
    path: Path
    hu: np.ndarray  # float32 [H, W] as written (after int16 rounding)
    label: np.ndarray  # uint8 [H, W]
    sop_instance_uid: str
    z: float


@dataclass(frozen=True)
class SeriesHeader:
    """Who and what a written series is: study, series and patient, modality, the series description
    and ImageType a scanner writes (``("DERIVED", "SECONDARY", ...)`` for a MIP or reformat)."""

    study_uid: str | None = None
    series_uid: str | None = None
    patient_id: str = "PHANTOM-1"
    series_number: int = 1
    modality: str = "CT"
    series_description: str = "Phantom abdomen CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")


@dataclass(frozen=True)
class SeriesGeometry:
    """Where the slices lie: the gap between them and their thickness (mm), in-plane spacing (mm), the
    orientation (ImageOrientationPatient; default axial), or explicit ``positions`` (irregular or tilted
    series in tests)."""

    spacing: float = 2.5
    pixel_spacing: float = 1.0
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    slice_thickness: float | None = None  # None: the spacing
    positions: tuple[tuple[float, float, float], ...] | None = None

    def position(self, k: int, size: tuple[int, int]) -> list[float]:
        if self.positions is not None:
            return list(self.positions[k])
        o = np.asarray(self.orientation, dtype=np.float64)
        normal = np.cross(o[:3], o[3:])
        corner = -0.5 * size[1] * self.pixel_spacing * o[:3] - 0.5 * size[0] * self.pixel_spacing * o[3:]
        return [float(v) for v in corner + k * self.spacing * normal]


def _ds(value: float) -> str:
    """A Decimal String value that fits DS's 16 characters (10 significant digits)."""
    return f"{float(value):.10g}"[:16]


def _slice_dataset(sop_class: str, uids: tuple[str, str, str], k: int, size: tuple[int, int], header: SeriesHeader,
                   geometry: SeriesGeometry, today: str) -> Any:
    """The header of slice ``k`` (no pixel data): what a CT scanner writes for one image."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    study_uid, series_uid, frame_uid = uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = header.modality
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = today
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "attunet-deploy phantom"
    ds.SeriesNumber = header.series_number
    ds.SeriesDescription = header.series_description
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "ABDOMEN"
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    # DS values are at most 16 characters: 400/96 mm written whole (4.166666666666667) is not valid DICOM
    ds.ImagePositionPatient = [_ds(v) for v in geometry.position(k, size)]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.PixelSpacing = [_ds(geometry.pixel_spacing)] * 2
    ds.SliceThickness = _ds(geometry.slice_thickness if geometry.slice_thickness is not None else geometry.spacing)
    ds.Rows, ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    if header.modality == "CT":
        ds.ImageType = list(header.image_type)
        ds.KVP = 120
    return ds


def write_ct_series(folder: str | Path, n_slices: int = 40, size: tuple[int, int] = (128, 128), seed: int = 0, *,
                    header: SeriesHeader | None = None, geometry: SeriesGeometry | None = None,
                    name: str = "slice_{:03d}.dcm", pixels: bool = True, volume: np.ndarray | None = None,
                    labels: np.ndarray | None = None) -> list[SeriesSlice]:
    """Write ``n_slices`` phantom slices of one series into ``folder``; returns them in z order.

    ``volume`` (HU [D, H, W], with ``labels`` alike) is written instead of independent 2D phantoms.
    ``header`` and ``geometry`` say what the series is and where its slices lie (defaults: an axial
    ORIGINAL/PRIMARY CT series, 2.5 mm apart, 1 mm pixels)."""
    from pydicom.uid import generate_uid

    header = header or SeriesHeader()
    geometry = geometry or SeriesGeometry()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = (header.study_uid or generate_uid(), header.series_uid or generate_uid(), generate_uid())
    sop_class = CT_IMAGE_STORAGE if header.modality == "CT" else MR_IMAGE_STORAGE
    today = _dt.date.today().strftime("%Y%m%d")
    out = []
    if volume is not None:
        n_slices, size = len(volume), (int(volume.shape[1]), int(volume.shape[2]))
    for k in range(n_slices):
        if volume is not None:
            hu = volume[k]
            label = labels[k] if labels is not None else np.zeros(size, np.uint8)
        else:
            hu, label = make_phantom(seed * 10_007 + k, size)
        stored = np.clip(np.round(hu + 1024.0), -32768, 32767).astype(np.int16)
        ds = _slice_dataset(sop_class, uids, k, size, header, geometry, today)
        if pixels:
            ds.PixelData = stored.tobytes()
        path = folder / name.format(k)
        ds.save_as(path, enforce_file_format=True)
        out.append(SeriesSlice(path, stored.astype(np.float32) - 1024.0, label, str(ds.SOPInstanceUID),
                               float(ds.ImagePositionPatient[2])))
    return out
