"""Writing a bundle: the writer lock, transactions staged inside the bundle, the commit journal
and the recovery of a commit cut short (even by ``kill -9``).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from attunet_deploy.bundle.schema import (
    ENGINE_DIR,
    INTERNAL_DIR,
    MANIFEST,
    OWNED_UNLISTED,
    ArtifactKind,
    Manifest,
    check_artifact_name,
    inside_bundle,
    now_iso,
    read_manifest,
    validate_manifest,
)
from attunet_deploy.errors import BundleError

if TYPE_CHECKING:
    from attunet_deploy.bundle.store import Bundle
from attunet_deploy.fileio import dir_lock, fsync_dir, write_json_atomic


# ====================================================================================== locks
def bundle_lock(root: Path, exclusive: bool) -> contextlib.AbstractContextManager[None]:
    """flock on the bundle directory: shared for readers, exclusive while a commit renames."""
    return dir_lock(root, exclusive)


class VerificationRecord(Protocol):
    """What a verification row gives the manifest (``judge.results.VerifyRow`` is one)."""

    @property
    def backend(self) -> str: ...

    @property
    def precision(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


#: Keys of a verification row that list every judged image (left out of the manifest).
PER_IMAGE_KEYS = ("dice_per_image", "gt_dice_per_image")


class WriterLock:
    """The advisory lock that makes one command at a time the writer of a bundle."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        d = self.root / INTERNAL_DIR
        try:
            if os.path.islink(d):
                raise BundleError(f"{d} is a symbolic link; remove it")
            d.mkdir(exist_ok=True)
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except PermissionError:
            raise BundleError(f"bundle {self.root} is not writable by this user") from None
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES):
                raise BundleError(f"bundle {self.root} is on a read-only filesystem") from None
            raise BundleError(f"cannot lock bundle {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            os.close(fd)
            raise BundleError(f"bundle {self.root} is busy: another attdeploy command (pid {holder}) is writing "
                              "it; wait for it to finish and try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ====================================================================================== transactions
_JOURNAL = "journal.json"


class Transaction:
    """Staged changes to one bundle, committed together with the manifest at the end.

    Use as a context manager: leaving the block with an exception (including Ctrl-C) discards
    everything; :meth:`commit` applies it. Staged files live in ``.attdeploy/txn-*`` inside
    the bundle (same filesystem, so the commit is a series of renames).
    """

    def __init__(self, root: Path, manifest: Manifest, *, bundle_type: type[Bundle],
                 created_root: bool = False, expect: Manifest | None = None) -> None:
        # The Bundle class is handed in (store imports this module, not the other way round).
        self.bundle_type = bundle_type
        self.root = Path(root)
        self.lock = WriterLock(self.root).acquire()
        try:
            _recover(self.root)
            if expect is not None and validate_manifest(read_manifest(self.root), self.root / MANIFEST) != expect:
                # Another command committed between our load and our lock: building on the old
                # manifest would list its new files with old hashes.
                raise BundleError(f"bundle {self.root} was changed by another command since it was loaded: run "
                                  "this command again")
            self.manifest = copy.deepcopy(manifest)
            self.old_artifacts = set(manifest.get("artifacts", {}))
            self.staging = self.root / INTERNAL_DIR / f"txn-{os.getpid()}-{secrets.token_hex(4)}"
            self.staging.mkdir()
        except BaseException:
            self.lock.release()
            raise
        self.created_root = created_root
        self.writes: dict[str, Path] = {}
        self.deletes: set[str] = set()
        self.delete_dirs: set[str] = set()
        self.done = False

    # ----------------------------------------------------------------- staging
    def stage(self, name: str) -> Path:
        """A path to write artifact (or owned file) ``name`` to; it replaces the live one on commit."""
        if not OWNED_UNLISTED.match(name):
            check_artifact_name(name)
        path = self.staging / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writes[name] = path
        self.deletes.discard(name)
        return path

    def add_artifact(self, name: str, *, kind: ArtifactKind | str, precision: str | None = None,
                     producer: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """List staged file ``name`` in the new manifest (size and sha256 of the staged bytes)."""
        path = self.writes.get(name)
        if path is None or not path.is_file():
            raise BundleError(f"internal: {name} was not staged before add_artifact")
        from attunet_deploy.fileio import sha256_file

        entry: dict[str, Any] = {"kind": str(ArtifactKind(kind))}
        if precision is not None:
            entry["precision"] = precision
        entry.update({"sha256": sha256_file(path), "bytes": path.stat().st_size, "created": now_iso(),
                      "producer": producer or {}})
        entry.update(extra)
        self.manifest["artifacts"][name] = entry
        if kind == ArtifactKind.ONNX and precision is not None:
            # Records judged the graph this one replaces: they say nothing about the new one.
            for key, row in list(self.manifest["verification"].items()):
                if isinstance(row, dict) and row.get("precision") == precision:
                    del self.manifest["verification"][key]
        return entry

    def remove(self, name: str) -> None:
        """Unlist ``name``; its file is deleted on commit if it was ours (listed before)."""
        self.manifest["artifacts"].pop(name, None)
        self.writes.pop(name, None)
        if name in self.old_artifacts or OWNED_UNLISTED.match(name):
            self.deletes.add(name)

    def remove_dir(self, rel: str) -> None:
        """Delete a folder we own inside the bundle (e.g. an engine cache) on commit."""
        if not rel.startswith(ENGINE_DIR + "/"):
            raise BundleError(f"internal: refusing to delete {rel} (not under {ENGINE_DIR}/)")
        check_artifact_name(rel)
        self.delete_dirs.add(rel)

    def record_verification(self, rows: Sequence[VerificationRecord]) -> None:
        for row in rows:
            # The per-image Dice lists are report material (report.json keeps them), not the record.
            kept = {k: v for k, v in row.to_dict().items() if k not in PER_IMAGE_KEYS}
            self.manifest["verification"][f"{row.backend}/{row.precision}"] = {**kept, "time": now_iso()}

    def set_input_profile(self, profile: dict[str, object]) -> None:
        """The manifest's ``input_profile`` (what the verified images looked like)."""
        self.manifest["input_profile"] = profile

    def set_golden(self, golden: dict[str, Any]) -> None:
        """The manifest's ``golden`` record (where the golden set came from)."""
        self.manifest["golden"] = golden

    def annotate(self, name: str, **extra: Any) -> None:
        """Add facts to a listed artifact's entry (e.g. ``trt_lint``)."""
        self.manifest["artifacts"][name].update(extra)

    def view(self) -> Bundle:
        """The bundle as it will be after commit (staged files served from staging)."""
        return self.bundle_type(self.root, self.manifest, overlay={n: p for n, p in self.writes.items()
                                                         if n in self.manifest["artifacts"]})

    # ----------------------------------------------------------------- commit / abort
    def commit(self) -> Bundle:
        """Apply every staged change with the manifest; returns the committed bundle."""
        if self.done:
            raise BundleError("internal: transaction already finished")
        validate_manifest(self.manifest, self.root / MANIFEST)
        self.manifest["updated"] = now_iso()
        for path in self.writes.values():
            if not path.is_file():
                raise BundleError(f"internal: staged file {path} is missing")
            _fsync_file(path)
        write_json_atomic(self.staging / MANIFEST, self.manifest)
        journal = {"writes": sorted(self.writes), "deletes": sorted(self.deletes),
                   "delete_dirs": sorted(self.delete_dirs)}
        # Signals are held back from here to the end: a commit is never half applied by Ctrl-C.
        # kill -9 can still cut it short; the journal written first lets the next command finish it.
        with _signals_deferred():
            write_json_atomic(self.staging / _JOURNAL, journal)
            fsync_dir(self.staging)
            _apply(self.root, self.staging)
            self.done = True
        self.lock.release()
        return self.bundle_type.load(self.root, check_hashes=False)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            if (self.staging / _JOURNAL).is_file():
                # The journal was written: the commit has begun and is finished, never half dropped
                # (if even that fails, the journal stays for the next command to finish).
                with _signals_deferred():
                    _apply(self.root, self.staging)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
                if self.created_root:
                    remove_if_only_internal(self.root)
        finally:
            self.lock.release()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if not self.done:
            self.abort()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block are held and re-raised after it.

    The Python-level handlers are swapped, not the thread's signal mask: a process-directed signal
    is delivered to any thread that does not block it (ONNX Runtime's and OpenMP's workers), and
    CPython then runs the Python handler in the main thread anyway, in the middle of the block.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []  # signal numbers delivered while the block ran
    old: dict[int, Any] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda signum, frame: held.append(signum))
    except (ValueError, OSError):
        for sig, h in old.items():
            signal.signal(sig, h)
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if held:
            signal.raise_signal(held[0])  # the restored handler runs now, after the block


def _apply(root: Path, staging: Path) -> None:
    """Carry out a journalled commit (idempotent: resumes where a killed commit stopped)."""
    journal = json.loads((staging / _JOURNAL).read_text(encoding="utf-8"))
    with bundle_lock(root, exclusive=True):
        for name in journal["writes"]:
            src = staging / "files" / name
            dst = inside_bundle(root, name)
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        for name in journal["deletes"]:
            dst = inside_bundle(root, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(dst).st_mode):
                    dst.unlink()
        for rel in journal["delete_dirs"]:
            dst = inside_bundle(root, rel)
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst, ignore_errors=True)
        if (staging / MANIFEST).exists():
            os.replace(staging / MANIFEST, root / MANIFEST)
        fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)


def _recover(root: Path) -> None:
    """With the writer lock held: finish journalled commits, drop unjournalled staging."""
    internal = root / INTERNAL_DIR
    if not internal.is_dir() or internal.is_symlink():
        return
    for txn in sorted(internal.glob("txn-*")):
        if not txn.is_dir() or txn.is_symlink():
            continue
        if (txn / _JOURNAL).is_file():
            try:
                _apply(root, txn)
            except (OSError, ValueError, KeyError) as exc:
                raise BundleError(f"cannot finish an interrupted commit in {txn}: {exc}") from exc
        else:
            shutil.rmtree(txn, ignore_errors=True)


def recover_if_needed(root: Path) -> None:
    """Readers: a journal left by a killed commit is finished first (if we may write)."""
    internal = root / INTERNAL_DIR
    try:
        pending = internal.is_dir() and any((t / _JOURNAL).is_file() for t in internal.glob("txn-*"))
    except OSError:
        return
    if not pending:
        return
    try:
        with WriterLock(root):
            _recover(root)
    except BundleError as exc:
        if "busy" in str(exc):
            return  # the live writer finishes it
        raise BundleError(f"bundle {root} has an interrupted commit that only a writer can finish ({exc}); "
                          "run 'attdeploy info' with write access") from None


def remove_if_only_internal(root: Path) -> None:
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    if all(e.name == INTERNAL_DIR for e in entries):
        shutil.rmtree(root / INTERNAL_DIR, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()
