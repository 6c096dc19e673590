"""DICOM Segmentation (SEG) of a CT series, written with highdicom.

BINARY, one segment per foreground class with its display colour (RecommendedDisplayCIELabValue),
AlgorithmIdentification naming attunet-deploy, its version and the model's sha256, and
ContributingEquipmentSequence (IHE AI Results: who made the result, with which model); frames
reference their source instances; the source study's patient and study attributes are kept; empty
frames are omitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.bundle.spec import Segment, segment_color
from attunet_deploy.fileio import atomic_path

#: SNOMED CT defaults for a segment the bundle does not name: category "Anatomical Structure", type
#: "Organ" (neutral: a liver model's SEG must not say pancreas). The demo names its segment
#: "Pancreas" (SCT 15776009) in its manifest, the task of Oktay et al.
DEFAULT_CATEGORY = ("SCT", "91723000", "Anatomical Structure")
DEFAULT_TYPE = ("SCT", "113343008", "Organ")
SEG_SERIES_NUMBER = 900


@dataclass(frozen=True)
class SegNaming:
    """What outputs call their segments: one per foreground class of the model (``classes``), each
    named by the bundle's ``postprocessing.segments`` where it has the class (label, type code,
    colour), else ``label`` ("<label> class <c>") with ``segment_type`` and the palette's colour."""

    classes: tuple[int, ...]
    label: str = "Target"
    category: tuple[str, str, str] = DEFAULT_CATEGORY
    segment_type: tuple[str, str, str] = DEFAULT_TYPE
    segments: tuple[Segment, ...] = ()
    #: ``label`` was given by the user (``--segment-label``): it names a one-class model's segment even
    #: where the bundle names it (the bundle's type code stays)
    override: bool = False

    @classmethod
    def of(cls, bundle: Bundle, label: str | None = None) -> SegNaming:
        return cls(tuple(bundle.spec.input.classes), label or "Target", segments=bundle.spec.postprocessing.segments,
                   override=label is not None)

    def _named(self, cls_: int) -> Segment | None:
        return next((s for s in self.segments if s.number == cls_), None)

    def describe(self, number: int, cls_: int) -> tuple[str, tuple[str, str, str]]:
        """(label, segmented property type) of segment ``number`` (class ``cls_``)."""
        named = self._named(cls_)
        kind = named.type if named is not None and named.type else self.segment_type
        if self.override and len(self.classes) == 1:
            name = self.label
        else:
            name = named.label if named is not None else (self.label if len(self.classes) == 1
                                                          else f"{self.label} class {cls_}")
        return name, kind

    def color(self, cls_: int) -> tuple[int, int, int]:
        return segment_color(cls_, self._named(cls_))

    def labels(self) -> dict[int, str]:
        return {c: self.describe(i, c)[0] for i, c in enumerate(self.classes, 1)}


@dataclass(frozen=True)
class Provenance:
    """Who made a result with which model: written into every output object."""

    model_sha256: str
    bundle_sha256: str = ""
    model_name: str = "AttentionUNet"

    def algorithm(self) -> Any:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        from attunet_deploy.version import __version__

        return hd.AlgorithmIdentificationSequence(name="attunet-deploy", family=codes.cid7162.ArtificialIntelligence,
                                                  version=__version__, parameters={"model_sha256": self.model_sha256})

    def equipment(self) -> list[Any]:
        """ContributingEquipmentSequence items (PS3.3 C.12.1, IHE AI Results)."""
        from highdicom.base_content import ContributingEquipment
        from pydicom.sr.codedict import codes

        from attunet_deploy.version import __version__

        return [ContributingEquipment(
            manufacturer="attunet-deploy", purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name[:64], software_versions=__version__,
            device_serial_number=self.model_sha256[:64],
            contribution_description=f"segmented by attunet-deploy {__version__}; model sha256 {self.model_sha256}"
            + (f"; bundle manifest sha256 {self.bundle_sha256}" if self.bundle_sha256 else ""))]


def build_seg(source_datasets: list[Any], masks: np.ndarray, naming: SegNaming, provenance: Provenance, *,
              series_number: int = SEG_SERIES_NUMBER, series_instance_uid: str | None = None,
              instance_number: int = 1) -> Any:
    """A highdicom Segmentation of ``masks`` (uint8 [N, H, W], same order as ``source_datasets``).

    One output channel: one segment. K classes (argmax): segments 1..K-1, one per class, named and
    coloured by ``naming``. A SEG that replaces an earlier one of the same source series keeps that
    SEG's ``series_instance_uid`` and takes the next ``instance_number``.
    """
    import highdicom as hd
    from highdicom.color import CIELabColor
    from pydicom.sr.coding import Code

    from attunet_deploy.version import __version__

    algo = provenance.algorithm()
    category = naming.category

    def describe(i: int, c: int) -> Any:
        name, kind = naming.describe(i, c)
        return hd.seg.SegmentDescription(
            segment_number=i, segment_label=name,
            segmented_property_category=Code(category[1], category[0], category[2]),
            segmented_property_type=Code(kind[1], kind[0], kind[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo,
            display_color=CIELabColor.from_rgb(*naming.color(c)))

    descriptions = [describe(i, c) for i, c in enumerate(naming.classes, 1)]
    pixels = (masks > 0) if len(naming.classes) == 1 else masks.astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "all frames empty": written in full, which is right
        return hd.seg.Segmentation(
            source_images=source_datasets, pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=instance_number,
            manufacturer="attunet-deploy", manufacturer_model_name=provenance.model_name[:64],
            software_versions=__version__, device_serial_number=provenance.model_sha256[:16],
            series_description=f"{naming.label} (attunet-deploy)"[:64], omit_empty_frames=True,
            contributing_equipment=provenance.equipment())


#: Value representations whose text may hold characters beyond ASCII (PS3.5 6.1.2.3).
_TEXT_VRS = ("PN", "LO", "SH", "ST", "LT", "UT", "UC")


def declare_charset(ds: Any) -> None:
    """Set SpecificCharacterSet to ISO_IR 192 (UTF-8) when any text value is not ASCII (a segment
    label in Japanese, a patient name with umlauts): without it such text is not valid DICOM."""
    def non_ascii(value: Any) -> bool:
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        return any(not str(v).isascii() for v in values if v is not None)

    found = False

    def visit(dataset: Any, elem: Any) -> None:
        nonlocal found
        if not found and elem.VR in _TEXT_VRS and non_ascii(elem.value):
            found = True

    ds.walk(visit)
    if found:
        ds.SpecificCharacterSet = "ISO_IR 192"


def write_dataset(ds: Any, path: Path) -> None:
    """Save a DICOM object atomically (temp file + rename): a reader or forwarder never sees half a file."""
    declare_charset(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


write_seg = write_dataset


def referenced_masks(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """The SEG's masks mapped back through its per-frame source references (uint8 [N, H, W], one
    per source uid; frames omitted as empty read as zeros). Used by tests and benchmarks."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1])
    return arr[..., 0].astype(np.uint8)
