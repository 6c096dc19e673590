"""Bounded reads: size limits for everything this tool reads, and regular-file checks.

Every limit can be raised with an environment variable, which the error message names, so a
user with a genuinely large checkpoint or image is told exactly what to set. Files are opened
with O_NONBLOCK and checked with fstat before any byte is read, so a FIFO, a device such as
/dev/zero or a directory is refused instead of hanging or exhausting memory.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from attunet_deploy.errors import InputError

#: The largest value any limit variable may take, per unit: far above any real need, and small
#: enough that every product computed from it stays an exact integer (no overflow, no inf).
CEILINGS = {"MB": float(2**24), "pixels": float(2**40), "images": float(10**7), "levels": float(10**4)}


def parse_limit(env: str, raw: str, unit: str) -> float:
    """The value of a limit variable: a finite positive number no larger than its unit's ceiling,
    a whole number where it counts things (pixels, images, levels); InputError naming the variable
    (exit 2) for anything else. The one parser of every ``ATTDEPLOY_MAX_*``."""
    ceiling = CEILINGS[unit]
    try:
        v = float(raw)
    except ValueError:
        raise InputError(f"{env}={raw[:40]!r} is not a number: unset it or give a positive number "
                         f"(at most {ceiling:,.0f} {unit})") from None
    if not math.isfinite(v) or v <= 0 or v > ceiling:
        raise InputError(f"{env}={raw[:40]!r}: must be a positive number no larger than {ceiling:,.0f} {unit}")
    if unit != "MB" and v != int(v):
        raise InputError(f"{env}={raw[:40]!r}: counts {unit}, so it must be a whole number")
    return v


@dataclass(frozen=True)
class Limit:
    """One limit: its environment variable, default and unit (for messages)."""

    env: str
    default: int
    unit: str  # "MB" (value in MiB), "pixels", "images" or "levels"
    what: str

    def value(self) -> float:
        raw = os.environ.get(self.env)
        if raw is None or not raw.strip():
            return float(self.default)
        return parse_limit(self.env, raw.strip(), self.unit)

    def bytes(self) -> int:
        """The limit as an integer: bytes for MB limits, else the count."""
        return int(self.value() * 2**20) if self.unit == "MB" else int(self.value())

    def describe(self) -> str:
        v = self.value()
        return f"{v:,.{0 if v == int(v) else 2}f} {self.unit}"


CHECKPOINT = Limit("ATTDEPLOY_MAX_CHECKPOINT_MB", 4096, "MB", "checkpoint size")
IMAGE_FILE = Limit("ATTDEPLOY_MAX_IMAGE_FILE_MB", 2048, "MB", "image file size (uncompressed data)")
#: Pixels of one 2D image. 16.7 MP (4096 x 4096) is far above any CT/MR slice; a full-size
#: Attention U-Net needs about 4 GB of activations per megapixel-channel block at that size.
IMAGE_PIXELS = Limit("ATTDEPLOY_MAX_IMAGE_PIXELS", 4096 * 4096, "pixels", "pixels per image")
MANIFEST = Limit("ATTDEPLOY_MAX_MANIFEST_MB", 16, "MB", "manifest size")
GOLDEN = Limit("ATTDEPLOY_MAX_GOLDEN_MB", 4096, "MB", "golden set size")
#: Decoded images one command keeps at once (verify --images, quantize --calib): folders are
#: sampled by file before decoding, so only an unusually large per-image size reaches it.
HELD_IMAGES = Limit("ATTDEPLOY_MAX_HELD_IMAGES_MB", 1024, "MB", "decoded images held at once")
#: Images ``verify --images`` judges (evenly spaced over the folder beyond it): every backend and
#: the reference run on each, so this bounds the command's time.
VERIFY_IMAGES = Limit("ATTDEPLOY_MAX_VERIFY_IMAGES", 512, "images", "images judged by verify --images")
#: Memory of one sliding-window pass over a volume: the padded input, its blended logits and the
#: weight map (float32). A 600x512x512 CT at full resolution needs about 2.5 GB.
WINDOW = Limit("ATTDEPLOY_MAX_WINDOW_MB", 4096, "MB", "sliding-window working memory")
JSON_DEPTH = Limit("ATTDEPLOY_MAX_JSON_DEPTH", 64, "levels", "JSON nesting depth")


def too_large(path: str | os.PathLike[str] | str, size: int, limit: Limit) -> InputError:
    return InputError(f"{path} is {size / 2**20:,.1f} MB, above the {limit.what} limit of {limit.describe()}: "
                      f"set {limit.env} to raise it")


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> int:
    """Size of ``path`` if it is a regular file (symlinks followed), else InputError."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {p}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {p} is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {p} is not a regular file (device, FIFO or socket): refusing to read it")
    return st.st_size


def check_file_size(path: str | os.PathLike[str], limit: Limit, what: str = "file") -> int:
    """Size of ``path`` if it is a regular file within ``limit``, else InputError (the one size check
    every reader makes before it decodes anything)."""
    size = check_regular_file(path, what)
    if size > limit.bytes():
        raise too_large(path, size, limit)
    return size


def read_bounded(path: str | os.PathLike[str], limit: Limit, what: str = "file") -> bytes:
    """The whole content of a regular file no larger than ``limit``.

    Opened non-blocking and checked with fstat *after* opening, so a file swapped for a FIFO
    between a stat and the open cannot hang the read.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, expected a file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} {path} is not a regular file (device, FIFO or socket): refusing to read it")
        if st.st_size > limit.bytes():
            raise too_large(path, st.st_size, limit)
        chunks = []
        remaining = limit.bytes() + 1
        while remaining > 0:
            block = os.read(fd, min(remaining, 1 << 24))
            if not block:
                break
            chunks.append(block)
            remaining -= len(block)
        data = b"".join(chunks)
        if len(data) > limit.bytes():  # grew while we read it
            raise too_large(path, len(data), limit)
        return data
    finally:
        os.close(fd)


def check_pixels(h: int, w: int, source: object, count: int = 1) -> None:
    """Refuse a 2D image above IMAGE_PIXELS before any pixel is decoded."""
    if h < 1 or w < 1:
        raise InputError(f"{source}: image has an empty axis ({h}x{w})")
    if h * w > IMAGE_PIXELS.bytes():
        raise InputError(f"{source}: image of {h}x{w} ({h * w / 1e6:.1f} MP) is above the limit of "
                         f"{IMAGE_PIXELS.describe()} per image: set {IMAGE_PIXELS.env} to raise it, or crop/tile it")
    del count


def json_depth_ok(text: str, max_depth: int | None = None) -> bool:
    """True when brackets in ``text`` nest no deeper than ``max_depth`` (strings skipped).

    Checked before json.loads so that a manifest nested 100,000 deep is refused with a
    message instead of a RecursionError.
    """
    limit = JSON_DEPTH.bytes() if max_depth is None else max_depth
    depth = 0
    in_str = False
    escape = False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True
