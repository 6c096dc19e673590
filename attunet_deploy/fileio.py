"""Atomic file writes: write to a temporary file beside the target, fsync, then rename; several
files at once through a hidden staging folder (:class:`StagingDir`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left as it was, so a
    reader never sees a half-written file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{short_name(target.name)}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; a bundle is copied and shared
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


STAGING_PREFIX = ".attdeploy-staging."
OWNER_FILE = ".owner"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return "-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders under ``out`` left by a process that died (kill -9): their owner
    file names a pid that is not running (or ran before the last boot). A folder without an owner
    file is left alone (another tool's, or a writer that has only just made it)."""
    removed = []
    for folder in out.glob(STAGING_PREFIX + "*"):
        try:
            pid_text, _, boot = (folder / OWNER_FILE).read_text(encoding="ascii").partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if boot.strip() != _boot_id() or not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class StagingDir:
    """Files written under a hidden folder inside ``out`` while the work that decides their final
    names still runs, then moved onto those names at once (:meth:`commit`, one rename each, every
    destination folder fsynced). :meth:`discard` removes whatever was not moved, and ``out`` too
    when this made it and it is still empty: a failed run leaves nothing behind."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.root: Path | None = None
        self._made_out = False

    def path(self, name: str) -> Path:
        """Where to write the staged file ``name`` (the folder is made on first use, with the writing
        process's pid inside, and stale folders of dead processes removed); the writer fsyncs it
        (:func:`fsync_file`)."""
        if self.root is None:
            self._made_out = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.out)
            self.root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
            (self.root / OWNER_FILE).write_text(f"{os.getpid()} {_boot_id()}\n", encoding="ascii")
        return self.root / name

    def commit(self, moves: list[tuple[Path, Path]]) -> None:
        """Rename each staged file onto its target (replacing one that exists). Every target is
        checked first: a target that is a directory, or under a file, refuses the whole commit
        (InputError) before anything is moved."""
        from attunet_deploy.errors import InputError

        for _, target in moves:
            if target.is_dir() and not target.is_symlink():
                raise InputError(f"{target} is a directory: an output cannot replace it; choose another -o")
            blocked = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
            if blocked is not None:
                raise InputError(f"{blocked} is a file where {target} needs a folder; choose another -o")
        parents: set[Path] = set()
        for staged, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            parents.add(target.parent)
        for parent in parents:
            fsync_dir(parent)

    def discard(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        if self._made_out:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only while empty


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def short_name(name: str, max_bytes: int = 80) -> str:
    """The start of ``name`` within ``max_bytes`` bytes, for hidden temp/staging names beside it.

    Capped in bytes, not characters: 100 four-byte characters pass a character cap and then fail
    the 255-byte file-name limit with ENAMETOOLONG.
    """
    return name.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike[str], exclusive: bool = True) -> Iterator[None]:
    """flock on a directory (shared or exclusive); a no-op where it cannot be opened or locked
    (e.g. some network filesystems)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask() is process-wide and racy under threads


def _umask() -> int:
    return _UMASK


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Infinity replaced by None, so the JSON is valid for every consumer (CI)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "to_dict"):  # typed records (verify rows, bench results) write their dict
        return json_safe(obj.to_dict())
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    return obj


def dumps(data: Any) -> str:
    return json.dumps(json_safe(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)


def write_json_atomic(target: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(target, dumps(data) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays end up in reports; keep json free of a numpy import here.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)  # Paths, numpy dtypes: their text is what a report wants


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
