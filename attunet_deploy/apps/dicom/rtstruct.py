"""RT Structure Set (RTSTRUCT) of a segmented CT series: what radiotherapy planning systems read.

One ROI per segment in the segment's colour; each slice's mask becomes closed planar contours in
patient coordinates (mm): ``skimage.measure.find_contours`` at level 0.5 on the mask padded by one
background pixel, so every contour closes and runs half a pixel outside the foreground's pixel
centres; holes are contours of their own (planning systems fill nested contours even-odd).

Built with pydicom, not rt-utils: rt-utils needs OpenCV, builds from a folder of files rather than
the datasets the node holds, and its contours needed a 90 degree fix in TotalSegmentator (nobody
checked the conversion). Here the conversion is the Image Plane module's equation (PS3.3 C.7.6.2.1.1)
and ``tests`` rasterise the contours back with an independent rasteriser to check it.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.seg import Provenance, SegNaming

RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
#: The RT Referenced Study's SOP class (Detached Study Management, as planning systems expect it).
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"
RTSTRUCT_SERIES_NUMBER = 901


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D binary mask, each [P, 2] as (row, column) pixel coordinates."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)
    return [c - 1.0 for c in find_contours(padded, 0.5) if len(c) >= 4]


def to_patient(points: np.ndarray, ds: Any) -> np.ndarray:
    """(row, column) pixel coordinates of one slice -> patient coordinates [P, 3] in mm."""
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    rows, cols = points[:, 0:1], points[:, 1:2]
    return ipp + cols * dc * iop[:3] + rows * dr * iop[3:]


def _item(**values: Any) -> Any:
    from pydicom import Dataset

    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def _copy(src: Any, dst: Any, keywords: tuple[str, ...]) -> None:
    for k in keywords:
        setattr(dst, k, getattr(src, k, "") or "")


def build_rtstruct(datasets: list[Any], masks: np.ndarray, naming: SegNaming, provenance: Provenance, *,
                   series_instance_uid: str, instance_number: int = 1) -> Any:
    """The RT Structure Set of ``masks`` (uint8 [N, H, W] in the order of ``datasets``)."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    from attunet_deploy.version import __version__

    first = datasets[0]
    now = _dt.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(RT_STRUCTURE_SET)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"  # segment labels may be any text
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    _copy(first, ds, ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                      "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_instance_uid, RTSTRUCT_SERIES_NUMBER, \
        instance_number
    ds.SeriesDescription = f"{naming.label} RTSTRUCT (attunet-deploy)"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = "attunet-deploy", provenance.model_name[:64]
    ds.SoftwareVersions, ds.DeviceSerialNumber = __version__, provenance.model_sha256[:64]
    ds.StructureSetLabel = "attunet-deploy"[:16]
    ds.StructureSetName = naming.label[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    frame_uid = str(first.FrameOfReferenceUID)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = getattr(first, "PositionReferenceIndicator", "") or ""
    images = [_item(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID) for d in datasets]
    series = _item(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=images)
    study = _item(ReferencedSOPClassUID=STUDY_COMPONENT, ReferencedSOPInstanceUID=first.StudyInstanceUID,
                  RTReferencedSeriesSequence=[series])
    ds.ReferencedFrameOfReferenceSequence = [_item(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=[study])]
    rois, roi_contours, observations = [], [], []
    for number, cls_ in enumerate(naming.classes, 1):
        name, _ = naming.describe(number, cls_)
        rois.append(_item(ROINumber=number, ReferencedFrameOfReferenceUID=frame_uid, ROIName=name[:64],
                          ROIGenerationAlgorithm="AUTOMATIC"))
        items = []
        for d, m in zip(datasets, masks):
            for c in contours(m == cls_):
                xyz = to_patient(c, d)
                items.append(_item(ContourImageSequence=[_item(ReferencedSOPClassUID=d.SOPClassUID,
                                                               ReferencedSOPInstanceUID=d.SOPInstanceUID)],
                                   ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(xyz),
                                   ContourData=[f"{v:.3f}" for v in xyz.ravel()]))
        roi = _item(ReferencedROINumber=number, ROIDisplayColor=list(naming.color(cls_)))
        if items:
            roi.ContourSequence = items
        roi_contours.append(roi)
        observations.append(_item(ObservationNumber=number, ReferencedROINumber=number,
                                  RTROIInterpretedType="ORGAN", ROIInterpreter=""))
    ds.StructureSetROISequence, ds.ROIContourSequence = rois, roi_contours
    ds.RTROIObservationsSequence = observations
    ds.ContributingEquipmentSequence = [e for e in provenance.equipment()]
    return ds
