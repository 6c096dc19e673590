"""Digest sidecars for run-time caches the backends write themselves (OpenVINO's compiled blobs in
``engines/openvino/``, ONNX Runtime TensorRT-EP engines in ``engines/ort-trt/``).

Those libraries load a cached blob without checking it: a file changed on disk gives wrong results
without an error. After a backend has written its cache, ``seal`` records each file's sha256 beside
it (``<file>.sha256``); before the backend opens the cache again, ``check`` deletes every file
whose digest is missing or does not match (the library rebuilds it) and says so once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from attunet_deploy.fileio import atomic_path

SUFFIX = ".sha256"
#: Cache files larger than this are not ours to hash on every start (a TensorRT engine is < 2 GB).
MAX_CACHE_FILE = 4 << 30


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, patterns: Sequence[str]) -> list[Path]:
    try:
        return sorted({p for pattern in patterns for p in folder.glob(pattern) if not p.name.endswith(SUFFIX)})
    except OSError:
        return []


def check(folder: Path, patterns: Sequence[str], say: Callable[[str], object] | None = None) -> list[str]:
    """Delete cache files in ``folder`` (matching ``patterns``) whose sidecar is missing or differs;
    returns their names. ``say`` gets one line when anything was deleted."""
    dropped = []
    for f in _files(folder, patterns):
        side = f.with_name(f.name + SUFFIX)
        try:
            ok = f.is_file() and not f.is_symlink() and f.stat().st_size <= MAX_CACHE_FILE and side.is_file() \
                and side.read_text(encoding="ascii", errors="replace").strip() == _digest(f)
        except OSError:
            ok = False
        if not ok:
            for p in (f, side):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
            dropped.append(f.name)
    if dropped and say is not None:
        say(f"run-time cache {folder}: {len(dropped)} file(s) did not match their recorded digest and were deleted "
            f"(rebuilt now): {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
    return dropped


def seal(folder: Path, patterns: Sequence[str]) -> None:
    """Record the digest of every cache file in ``folder`` that has none yet."""
    for f in _files(folder, patterns):
        side = f.with_name(f.name + SUFFIX)
        if side.exists() or not f.is_file() or f.is_symlink():
            continue
        try:
            digest = _digest(f)
            with atomic_path(side) as tmp:
                tmp.write_text(digest + "\n", encoding="ascii")
        except OSError:
            continue  # a read-only cache: checked next time as unsealed, i.e. rebuilt
