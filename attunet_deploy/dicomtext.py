"""Text written into DICOM objects (segment labels and the like), checked when the option is parsed
rather than when an object is written: one line and exit 2 instead of a traceback or an invalid
object. Characters beyond ASCII are allowed; the writer declares UTF-8 for them
(``apps/dicom/seg.py: declare_charset``)."""

from __future__ import annotations

from typing import Any

from attunet_deploy.errors import InputError


def check_dicom_text(text: Any, what: str, max_chars: int = 64, field: str | None = None) -> str:
    """A string to be written as a DICOM LO/SH value: 1..max_chars characters, none of them a
    backslash (the value separator) or a control character; non-ASCII is allowed (written as
    UTF-8 with SpecificCharacterSet ISO_IR 192). Returns it stripped; InputError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} is empty: give 1..{max_chars} characters", field=field)
    text = text.strip()
    if len(text) > max_chars:
        raise InputError(f"{what} {text[:20]!r}... has {len(text)} characters: at most {max_chars} fit its DICOM "
                         "attribute", field=field)
    if "\\" in text:
        raise InputError(f"{what} {text[:40]!r}: a backslash separates DICOM values and cannot be in one",
                         field=field)
    if not text.isprintable():
        raise InputError(f"{what} {text[:40]!r}: control characters cannot be written into DICOM text",
                         field=field)
    return text
