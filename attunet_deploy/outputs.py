"""Where a command may write: one check for every output path (--json, --save-diff, -o), run
before any work, so a bad path is one line and exit 2 instead of an error after minutes of work.

The rules (README, "What the tool promises about your files"): an output is never inside a
bundle (a bundle changes only through its own transactions), never on a virtual filesystem
(/proc, /sys, /dev), never below a regular file, never a dangling symbolic link, and every path
component fits the filesystem's name limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from attunet_deploy.errors import InputError

VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
NAME_MAX = 255  # bytes per path component on Linux filesystems


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def enclosing_bundle(path: Path) -> Path | None:
    """The bundle directory ``path`` lies in (or is), if any."""
    from attunet_deploy.bundle import MANIFEST, is_bundle_dir

    for p in (path, *path.parents):
        if (p / MANIFEST).is_file() and is_bundle_dir(p):
            return p
    return None


def check_output(path: str | os.PathLike[str], option: str, *, kind: str = "file", empty: bool = False,
                 bundles: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Validate an output path; returns it resolved. ``kind`` is "file" (its folder must exist: a
    typo in a folder name is an error, not a new folder) or "dir" (created with its parents);
    ``empty``: a folder must be new or empty (no earlier file is silently replaced)."""
    text = os.fspath(path)
    if not text.strip():
        raise InputError(f"{option}: the path is empty")
    raw = Path(text)
    for part in Path(os.path.abspath(raw)).parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise InputError(f"{option} {text[:80]}...: a path component is longer than {NAME_MAX} bytes")
    try:
        if raw.is_symlink() and not raw.exists():
            raise InputError(f"{option} {text}: a symbolic link to a missing target; give a real path")
        resolved = raw.resolve()
        return _check_resolved(resolved, text, option, kind, empty, bundles)
    except OSError as exc:  # a path the kernel refuses (loops, names too long after links, ...)
        raise InputError(f"{option} {text[:120]}: unusable path ({exc.strerror or exc})") from None


def _check_resolved(resolved: Path, text: str, option: str, kind: str, empty: bool,
                    bundles: Iterable[str | os.PathLike[str] | None]) -> Path:
    for root in VIRTUAL_ROOTS:
        if _inside(resolved, root):
            raise InputError(f"{option} {text}: {root} is a virtual filesystem, not a place for output files")
    existing = resolved
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for b in bundles:
        if b is not None and _inside(resolved, Path(b).resolve()):
            raise InputError(f"{option} {text} is inside the bundle {b}: a bundle changes only through attdeploy's "
                             "own steps; choose a path outside it")
    found = enclosing_bundle(resolved if resolved.exists() else existing)
    if found is not None:
        raise InputError(f"{option} {text} is inside the bundle {found}: choose a path outside it")
    if existing != resolved and not existing.is_dir():
        raise InputError(f"{option} {text}: {existing} is a file, so nothing can be written below it")
    if kind == "file" and existing not in (resolved, resolved.parent):
        raise InputError(f"{option} {text}: folder {resolved.parent} does not exist")
    if existing == resolved:
        if kind == "file" and resolved.is_dir():
            raise InputError(f"{option} {text} is a directory: give a file path")
        if kind == "file" and not resolved.is_file():
            raise InputError(f"{option} {text} exists and is not a regular file")
        if kind == "dir" and not resolved.is_dir():
            raise InputError(f"{option} {text} exists and is not a directory")
        if kind == "dir" and empty and any(resolved.iterdir()):
            raise InputError(f"{option} {text}: choose a new or empty folder (it holds files already)")
    writable_at = existing if existing != resolved or kind == "dir" else resolved.parent
    if not os.access(writable_at, os.W_OK):
        raise InputError(f"{option} {text}: {writable_at} is not writable")
    return resolved
