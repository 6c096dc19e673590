"""A TID 1500 measurement report (Comprehensive 3D SR) of a segmented series: each segment's volume
in ml, referencing the segment in the SEG, and the QA status (ok / review) with its reasons.

Built with highdicom (``MeasurementReport`` of ``VolumetricROIMeasurementsAndQualitativeEvaluations``).
The QA status is a qualitative evaluation coded in this project's private scheme (``99ATTDEPLOY``:
DICOM reserves designators starting with 99 for local schemes); its reasons are TEXT items beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.seg import Provenance, SegNaming
from attunet_deploy.qa import QaResult

SR_SERIES_NUMBER = 903
SCHEME = "99ATTDEPLOY"


def segment_volumes(masks: np.ndarray, naming: SegNaming, voxel_mm3: float) -> dict[int, float]:
    """Class -> volume in ml: voxel count x voxel volume."""
    return {c: float(np.count_nonzero(masks == c)) * voxel_mm3 / 1000.0 for c in naming.classes}


def build_sr(seg: Any, datasets: list[Any], masks: np.ndarray, naming: SegNaming, provenance: Provenance,
             qa: QaResult, *, voxel_mm3: float, series_instance_uid: str, instance_number: int = 1) -> Any:
    """The measurement report of ``masks`` (the SEG ``seg`` was written from them)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from attunet_deploy.version import __version__

    algorithm = hd.sr.AlgorithmIdentification(name="attunet-deploy", version=__version__,
                                              parameters=[f"model sha256 {provenance.model_sha256}"])
    status_name = Code("qa-status", SCHEME, "Result review status")
    status = Code(qa.status, SCHEME, "No review needed" if qa.status == "ok" else "Review before use")
    reason_name = Code("qa-reason", SCHEME, "Reason for review")
    volumes = segment_volumes(masks, naming, voxel_mm3)
    source_series = hd.sr.SourceSeriesForSegmentation(str(datasets[0].SeriesInstanceUID))
    groups = []
    for number, cls_ in enumerate(naming.classes, 1):
        name, kind = naming.describe(number, cls_)
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
            referenced_segment=hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID,
                                                       sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
                                                       source_series=source_series),
            finding_type=Code(kind[1], kind[0], kind[2]), algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=round(volumes[cls_], 6),
                                            unit=Code("ml", "UCUM", "milliliter"), algorithm_id=algorithm)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(status_name, status)])
        for reason in qa.reasons:
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=reason_name, value=reason[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                     observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                                         uid=hd.UID(), manufacturer_name="attunet-deploy",
                                         model_name=provenance.model_name[:64]))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=Code("25045-6", "LN", "CT unspecified body region"),
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=[seg, *datasets], content=report, series_instance_uid=series_instance_uid,
                                 series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                                 instance_number=instance_number, manufacturer="attunet-deploy",
                                 is_complete=True, contributing_equipment=provenance.equipment())
    sr.SeriesDescription = f"{naming.label} volumes (attunet-deploy)"[:64]
    return sr
