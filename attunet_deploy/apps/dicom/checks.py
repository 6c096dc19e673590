"""What the DICOM node checks on receipt, before it answers Success.

A node next to patient data must not trust a single byte of what it is sent: UIDs become folder
and file names, and pixel attributes decide how many bytes are read. Every check here returns a
reason (str) or None, so the SCP can log it and answer a failure status instead of raising.
"""

from __future__ import annotations

import re
from typing import Any

from attunet_deploy.io.dicom import CT_IMAGE_STORAGE, text_of

#: PS3.5 §9.1: components of digits, no leading zero (except "0" itself), dots between, <= 64 chars.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
UID_MAX = 64
#: Attributes whose UIDs the node uses (as names on disk or copied into the SEG).
UID_ATTRIBUTES = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
NATIVE_BITS = (8, 16)


def is_valid_uid(value: object) -> bool:
    """True for a DICOM UID that is safe as a file name (never ``.``/``..``, no ``/``)."""
    return isinstance(value, str) and 0 < len(value) <= UID_MAX and _UID.fullmatch(value) is not None


def uid_problem(ds: Any, request_class: str, request_instance: str) -> tuple[int, str] | None:
    """(status, reason) when the request's or the dataset's UIDs are unusable, else None.

    Invalid UIDs: 0xC000 (cannot understand). Dataset and request disagree: 0xA900 (PS3.4 B.2.3).
    """
    if not is_valid_uid(request_instance):
        return 0xC000, f"Affected SOP Instance UID {request_instance[:80]!r} is not a valid DICOM UID"
    for keyword in UID_ATTRIBUTES:
        value = text_of(ds, keyword)
        if not value:
            return 0xC000, f"no {keyword}"
        if not is_valid_uid(value):
            return 0xC000, f"{keyword} {value[:80]!r} is not a valid DICOM UID (digits and dots, at most 64)"
    if text_of(ds, "SOPClassUID") != request_class:
        return 0xA900, "the dataset's SOP Class UID differs from the C-STORE request's"
    if text_of(ds, "SOPInstanceUID") != request_instance:
        return 0xA900, "the dataset's SOP Instance UID differs from the C-STORE request's"
    return None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = getattr(ds, keyword, None)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def pixel_problem(ds: Any, transfer_syntax: Any, max_pixels: int) -> str | None:
    """Why the pixel data of a CT slice cannot be used (None when it can).

    Native syntaxes: the attributes and the PixelData length must agree exactly (the value may be
    padded by one byte to an even length). Encapsulated syntaxes: the frame is decoded here, so
    a corrupt or truncated codestream is refused before Success rather than found later.
    """
    if text_of(ds, "SOPClassUID") != CT_IMAGE_STORAGE:
        return "not CT Image Storage"
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    samples, rep = _int(ds, "SamplesPerPixel"), _int(ds, "PixelRepresentation")
    frames = _int(ds, "NumberOfFrames") or 1
    if not rows or not cols or rows < 1 or cols < 1:
        return "no Rows/Columns"
    if rows * cols > max_pixels:
        return f"{rows}x{cols} is above the limit of {max_pixels:,} pixels per image"
    if samples != 1:
        return f"SamplesPerPixel {samples}: a CT slice has 1"
    if bits not in NATIVE_BITS:
        return f"BitsAllocated {bits}: CT pixel data has 8 or 16"
    if stored is None or not 1 <= stored <= bits:
        return f"BitsStored {stored} does not fit BitsAllocated {bits}"
    if rep not in (0, 1):
        return f"PixelRepresentation {rep}: must be 0 or 1"
    if frames != 1:
        return f"NumberOfFrames {frames}: one frame per CT instance"
    if text_of(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        return f"PhotometricInterpretation {text_of(ds, 'PhotometricInterpretation')!r}: CT is MONOCHROME1/2"
    if "PixelData" not in ds:
        return "no pixel data"
    if not getattr(transfer_syntax, "is_compressed", False):
        try:
            length = len(ds.PixelData)
        except Exception as exc:
            return f"unreadable PixelData ({str(exc)[:80]})"
        expected = rows * cols * bits // 8
        if length not in (expected, expected + 1):
            return (f"PixelData holds {length} bytes; {rows}x{cols} at {bits} bits needs {expected}: "
                    "the attributes and the pixel data disagree")
        return None
    try:
        arr = ds.pixel_array
    except Exception as exc:
        return f"cannot decode the {getattr(transfer_syntax, 'name', 'compressed')} pixel data ({str(exc)[:100]})"
    if tuple(arr.shape) != (rows, cols):
        return f"decoded pixel data has shape {tuple(arr.shape)}, the header says {rows}x{cols}"
    return None
