"""A Secondary Capture overlay series for PACS viewers that cannot show SEG: each source slice with
a segment, in the CT window, with every segment's outline burned in in its colour at half opacity.

Each image is a highdicom ``SCImage`` built from its source slice (patient and study kept, the same
position and orientation, so viewers place it beside the CT) and says which slice it shows
(``SourceImageSequence``). Only slices holding a segment are written: a 100-slice 512x512 RGB series
would be 78 MB, most of it the CT again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.seg import Provenance, SegNaming

SC_SERIES_NUMBER = 902
#: Opacity of the outlines over the CT (the issue's "about 0.5": the anatomy under them stays visible).
ALPHA = 0.5
#: The window when the bundle's normalisation is not a CT window: soft tissue (level, width HU).
SOFT_TISSUE = (40.0, 400.0)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels, two pixels thick (visible at 512x512 on a 1080p screen)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=2)
    return mask & ~inner


def burn(hu: np.ndarray, mask: np.ndarray, naming: SegNaming, window: tuple[float, float]) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the slice in the window, each class's outline blended in its colour."""
    level, width = window
    grey = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for c in naming.classes:
        edge = outline(mask == c)
        rgb[edge] = (1 - ALPHA) * rgb[edge] + ALPHA * np.asarray(naming.color(c), dtype=np.float64)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def build_overlays(datasets: list[Any], hu: list[np.ndarray], masks: np.ndarray, naming: SegNaming,
                   provenance: Provenance, *, window: tuple[float, float], series_instance_uid: str) -> list[Any]:
    """One Secondary Capture image per slice with a segment (source order), in series ``series_instance_uid``."""
    import highdicom as hd
    from pydicom import Dataset

    out: list[Any] = []
    for k, (ds, image, m) in enumerate(zip(datasets, hu, masks)):
        if not m.any():
            continue
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds, pixel_array=burn(image, m, naming, window), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_instance_uid,
            series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=len(out) + 1,
            manufacturer="attunet-deploy", pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),  # type: ignore[arg-type]  # highdicom's hint says int; PixelSpacing is DS (mm)
            patient_orientation=("L", "P"), contributing_equipment=provenance.equipment())
        sc.SeriesDescription = f"{naming.label} overlay (attunet-deploy)"[:64]
        sc.BurnedInAnnotation = "YES"  # the outlines are in the pixels
        sc.Laterality = getattr(ds, "Laterality", "") or ""  # type 2C: empty for an unpaired body part
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.DerivationDescription = f"outline of the segmentation over source slice {k + 1} (CT window)"
        out.append(sc)
    return out
