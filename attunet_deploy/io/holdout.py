"""Splitting a user's image set into held-out golden images and calibration images (never overlapping).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from attunet_deploy.errors import InputError
from attunet_deploy.io.arrays import ImageRecord
from attunet_deploy.io.files import relative_name
from attunet_deploy.io.images import read_file, subsample

#: Held-out golden images: a quarter of the files, at least 1 and at most 32 files ...
GOLDEN_FRACTION = 0.25
GOLDEN_MAX_FILES = 32
#: ... and at most this many 2D images in all (volumes contribute evenly spaced slices).
GOLDEN_MAX_IMAGES = 64
GOLDEN_MAX_PER_FILE = 16


# ===================================================================================== golden split
def split_holdout(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(golden, calibration) files: a deterministic quarter (1..32 files) held out for verification.

    A file's rank is the sha256 of its path relative to ``root`` (so the split does not depend
    on where the folder lives or on file order); the lowest-ranked quarter is held out.
    """
    if not files:
        raise InputError(f"no images in {root}")
    ranked = sorted(files, key=lambda f: hashlib.sha256(relative_name(f, root).encode()).hexdigest())
    k = min(GOLDEN_MAX_FILES, max(1, round(len(files) * GOLDEN_FRACTION)))
    held = set(ranked[:k])
    return [f for f in files if f in held], [f for f in files if f not in held]


def split_images(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(golden, calibration) images of a single multi-image file (a volume or a stack): a
    deterministic quarter of its images, ranked by the sha256 of ``path[index]``."""
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{r.rel}[{r.index}]".encode()).hexdigest())
    k = min(GOLDEN_MAX_IMAGES, max(1, round(len(records) * GOLDEN_FRACTION)))
    held = {id(r) for r in ranked[:k]}
    return [r for r in records if id(r) in held], [r for r in records if id(r) not in held]


def golden_records(files: list[Path], root: Path, channels: int) -> list[ImageRecord]:
    """The held-out images, at most GOLDEN_MAX_PER_FILE slices of a volume and GOLDEN_MAX_IMAGES in all."""
    out: list[ImageRecord] = []
    for f in files:
        recs = read_file(f, channels, relative_name(f, root))
        out += subsample(recs, GOLDEN_MAX_PER_FILE)
    return subsample(out, GOLDEN_MAX_IMAGES)
