"""DICOM Segmentation (SEG) of a CT series, written with highdicom.

BINARY, one segment per foreground class, AlgorithmIdentification naming attunet-deploy, its
version and the model's sha256; frames reference their source instances; the source study's
patient and study attributes are kept; empty frames are omitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.bundle.spec import Segment
from attunet_deploy.fileio import atomic_path

#: SNOMED CT defaults: category "Anatomical Structure", type "Pancreas" (the task of Oktay et al.).
DEFAULT_CATEGORY = ("SCT", "91723000", "Anatomical Structure")
DEFAULT_TYPE = ("SCT", "15776009", "Pancreas")
SEG_SERIES_NUMBER = 900


@dataclass(frozen=True)
class SegNaming:
    """What a SEG calls its segments: one per foreground class of the model (``classes``), each
    named by the bundle's ``postprocessing.segments`` where it has the class (label, and the
    segmented property type code), else ``label`` ("<label> class <c>") with ``segment_type``."""

    classes: tuple[int, ...]
    label: str = "Target"
    category: tuple[str, str, str] = DEFAULT_CATEGORY
    segment_type: tuple[str, str, str] = DEFAULT_TYPE
    segments: tuple[Segment, ...] = ()

    @classmethod
    def of(cls, bundle: Bundle, label: str = "Target") -> SegNaming:
        return cls(tuple(bundle.spec.input.classes), label, segments=bundle.spec.postprocessing.segments)

    def describe(self, number: int, cls_: int) -> tuple[str, tuple[str, str, str]]:
        """(label, segmented property type) of segment ``number`` (class ``cls_``)."""
        named = next((s for s in self.segments if s.number == cls_), None)
        kind = named.type if named is not None and named.type else self.segment_type
        name = named.label if named is not None else (self.label if len(self.classes) == 1
                                                      else f"{self.label} class {cls_}")
        return name, kind


def build_seg(source_datasets: list[Any], masks: np.ndarray, naming: SegNaming, *, model_sha256: str,
              series_number: int = SEG_SERIES_NUMBER, series_instance_uid: str | None = None,
              instance_number: int = 1) -> Any:
    """A highdicom Segmentation of ``masks`` (uint8 [N, H, W], same order as ``source_datasets``).

    One output channel: one segment. K classes (argmax): segments 1..K-1, one per class, named by
    ``naming``. A SEG that replaces an earlier one of the same source series keeps that SEG's
    ``series_instance_uid`` and takes the next ``instance_number``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from attunet_deploy.version import __version__

    algo = hd.AlgorithmIdentificationSequence(name="attunet-deploy", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__, parameters={"model_sha256": model_sha256})
    category = naming.category

    def describe(i: int, c: int) -> Any:
        name, kind = naming.describe(i, c)
        return hd.seg.SegmentDescription(
            segment_number=i, segment_label=name,
            segmented_property_category=Code(category[1], category[0], category[2]),
            segmented_property_type=Code(kind[1], kind[0], kind[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)

    descriptions = [describe(i, c) for i, c in enumerate(naming.classes, 1)]
    pixels = (masks > 0) if len(naming.classes) == 1 else masks.astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "all frames empty": written in full, which is right
        return hd.seg.Segmentation(
            source_images=source_datasets, pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=instance_number,
            manufacturer="attunet-deploy", manufacturer_model_name="AttentionUNet", software_versions=__version__,
            device_serial_number=model_sha256[:16], series_description=f"{naming.label} (attunet-deploy)",
            omit_empty_frames=True)


def write_seg(seg: Any, path: Path) -> None:
    """Save a SEG atomically (temp file + rename): a reader or forwarder never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def referenced_masks(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """The SEG's masks mapped back through its per-frame source references (uint8 [N, H, W], one
    per source uid; frames omitted as empty read as zeros). Used by tests and benchmarks."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, segment_numbers=[1])
    return arr[..., 0].astype(np.uint8)
