"""Finding the user's files: supported extensions, folder walks, names relative to what the
user gave, and the one wrapper that turns a reader library's exception into an InputError.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from attunet_deploy import limits
from attunet_deploy.errors import InputError

ARRAY_EXT = (".npy", ".npz")
RASTER_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
DICOM_EXT = (".dcm", ".dicom", ".ima")
NIFTI_EXT = (".nii", ".nii.gz")
SUPPORTED = ", ".join(ARRAY_EXT + RASTER_EXT + DICOM_EXT + NIFTI_EXT)
LABEL_EXT = (".npy", ".npz", ".png", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_key(rel: str) -> str:
    """Relative path without its extension: ``a/b/slice_012.dcm`` -> ``a/b/slice_012`` (label matching)."""
    p = Path(rel)
    suffix = suffix_of(p)
    name = p.name[: -len(suffix)] if suffix and p.name.lower().endswith(suffix) else p.name
    return (p.parent / name).as_posix() if str(p.parent) != "." else name


def is_dicom_file(path: Path) -> bool:
    if suffix_of(path) in DICOM_EXT:
        return True
    if path.suffix:  # DICOM files often have no extension; anything else with one is not DICOM
        return False
    try:
        if not path.is_file():
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, 4, 128) == b"DICM"
        finally:
            os.close(fd)
    except OSError:
        return False


def walk_files(root: Path) -> list[Path]:
    """Every regular file under folder ``root``, hidden files and folders excluded, sorted: the one walk
    of an input folder. A folder on a virtual filesystem (/proc, /sys, /dev) or one that cannot be read
    is an InputError naming it, never a crawl or a traceback."""
    from attunet_deploy.outputs import VIRTUAL_ROOTS

    resolved = root.resolve()
    for virtual in VIRTUAL_ROOTS:
        if resolved == virtual or virtual in resolved.parents:
            raise InputError(f"{root} is on {virtual}, a virtual filesystem: give a folder of image files")
    out: list[Path] = []

    def refuse(exc: OSError) -> None:
        raise InputError(f"cannot read {exc.filename or root}: {exc.strerror or exc}")

    for folder, dirs, names in os.walk(root, onerror=refuse):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / n for n in names if not n.startswith(".") and (Path(folder) / n).is_file()]
    return sorted(out)


def list_image_files(path: str | os.PathLike[str], exts: tuple[str, ...] | None = None) -> list[Path]:
    """Supported files at ``path`` (a file, or a directory searched recursively), sorted."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"image path not found: {p}")
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(f"{p} is not a regular file or folder (device, FIFO or socket)")
    allowed = exts or (ARRAY_EXT + RASTER_EXT + NIFTI_EXT)
    files = [f for f in walk_files(p) if suffix_of(f) in allowed or (exts is None and is_dicom_file(f))]
    if not files:
        what = "label masks" if exts else "images"
        raise InputError(f"no {what} in {p} (supported: {', '.join(exts) if exts else SUPPORTED}"
                         f"{'' if exts else ', or DICOM without extension'})")
    return files


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to the folder the user named (its own name when ``root`` is the file)."""
    if root.is_file() or root == path:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


@contextlib.contextmanager
def reading(path: Path, what: str = "") -> Iterator[None]:
    """Turn whatever a reader library raises into one InputError naming the file; library
    warnings are not the user's business, errors are."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except InputError:
        raise
    except ImportError as exc:
        raise InputError(f"{what}{path}: reading it needs {exc.name}: pip install 'attunet-deploy[medical]'") from exc
    except MemoryError:
        raise InputError(f"{what}{path}: not enough memory to read it; lower its size or "
                         f"{limits.IMAGE_FILE.env}") from None
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {what}{path}: {text}") from exc


def file_sha256(path: Path) -> str:
    limits.check_regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
