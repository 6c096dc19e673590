"""The deployment bundle: a directory with ``manifest.json`` and the artifacts it lists.

Numpy-free and torch-free so that a device with only onnxruntime/tensorrt can read it.

What this module guarantees (design.md section 5a):

- **Nothing outside the bundle.** Artifact names are plain relative names (``model.onnx``,
  ``engines/x.engine``): no ``..``, no absolute paths, no hidden or odd characters; every
  artifact must be a regular file reached without symbolic links. The manifest is validated
  field by field on load, so a damaged or hostile manifest is a one-line ``BundleError``.
- **Transactions.** Writers never touch the live files while they work: a :class:`Transaction`
  stages new files under ``.attdeploy/txn-*`` inside the bundle and commits them together
  with the manifest at the very end. The commit writes a journal first; a commit cut short
  (even by ``kill -9``) is rolled forward by the next command, and an uncommitted one leaves
  the bundle byte-identical.
- **One writer at a time.** Writers hold an advisory lock (``.attdeploy/lock``); a second one
  gets exit 2 "bundle is busy". Readers take a shared lock on the bundle directory while
  they read the manifest and artifacts, and a commit takes it exclusively, so a reader sees
  the old bundle or the new one, never a mix.
- **Bounded reads.** Manifest size and nesting depth are limited; artifacts are hashed only
  when they are regular files of the recorded size.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import limits
from .errors import BundleError, InputError
from .fileio import dir_lock, fsync_dir, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT_NAME = "attunet-deploy-bundle"
PRECISIONS = ("fp32", "fp16", "int8")

#: Artifact file for each precision's ONNX graph.
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
WEIGHTS_FILE = "weights.pt"
TORCHSCRIPT_FILE = "model.ts"
GOLDEN_FILE = "golden.npz"
ENGINE_DIR = "engines"
#: Our private folder inside a bundle: the writer lock and transaction staging. Never an artifact.
INTERNAL_DIR = ".attdeploy"
#: Files we write into a bundle without listing them (derived, human-facing or caches).
REPORT_FILES = ("report.md", "report.json")
_OWNED_UNLISTED = re.compile(r"^(report\.md|report\.json|engines/timing-trt[0-9A-Za-z.+-]+\.cache)$")
#: One path component of an artifact name: starts with a letter or digit, no separators.
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,159}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NORMALIZE_KINDS = ("none", "ct_window", "mean_std", "scale", "minmax")
_MAX_CHANNELS = 4096


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ====================================================================================== names
def check_artifact_name(name: Any) -> str:
    """``name`` if it is a plain relative artifact name inside a bundle, else BundleError."""
    if not isinstance(name, str):
        raise BundleError(f"artifact name {name!r} is not a string; re-export the bundle")
    parts = name.split("/")
    if (len(parts) > 3 or name in (MANIFEST,) or parts[0] == INTERNAL_DIR
            or not all(_COMPONENT.match(p) for p in parts)):
        raise BundleError(f"artifact name {name[:80]!r} is not a plain relative name inside the bundle "
                          "(no '..', absolute paths or special characters): the manifest was edited or is "
                          "hostile; re-export the bundle")
    return name


def _inside(root: Path, name: str) -> Path:
    """root/name after checking that no component on the way is a symbolic link."""
    path = root
    for part in name.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return root / name
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{path} is a symbolic link: bundle artifacts must be plain files inside the "
                              "bundle; replace the link with the file")
    return root / name


# ====================================================================================== validation
class _Checker:
    """Field-by-field manifest checks that name the offending field in one line."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> None:
        raise BundleError(f"{self.where}: {field} {problem}; re-export the bundle (or restore the manifest)")

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, "must be an object")
        return value

    def int_(self, value: Any, field: str, lo: int = 0, hi: int = 2**62) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(field, f"must be an integer in [{lo}, {hi}]")
        return value

    def num(self, value: Any, field: str, lo: float = -math.inf, hi: float = math.inf,
            lo_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(field, "must be a finite number")
        if value < lo or value > hi or (lo_open and value == lo):
            self.fail(field, f"is {value}, out of range")
        return float(value)

    def str_(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, "must be a string")
        return value


def validate_preprocessing(pre: Any, channels: int, ck: _Checker) -> None:
    pre = ck.obj(pre, "preprocessing")
    norm = ck.obj(pre.get("normalize", {"kind": "none"}), "preprocessing.normalize")
    kind = norm.get("kind", "none")
    if kind not in _NORMALIZE_KINDS:
        ck.fail("preprocessing.normalize.kind", f"{str(kind)[:40]!r} is not one of {', '.join(_NORMALIZE_KINDS)}")
    if kind == "ct_window":
        ck.num(norm.get("level"), "preprocessing.normalize.level")
        ck.num(norm.get("width"), "preprocessing.normalize.width", lo=0.0, lo_open=True)
    elif kind == "mean_std":
        for key in ("mean", "std"):
            vals = norm.get(key)
            if not isinstance(vals, list) or len(vals) not in (1, channels):
                ck.fail(f"preprocessing.normalize.{key}", f"must be a list of 1 or {channels} numbers")
            for v in vals:
                ck.num(v, f"preprocessing.normalize.{key}", lo=0.0 if key == "std" else -math.inf,
                       lo_open=key == "std")
    elif kind == "scale":
        d = ck.num(norm.get("divisor"), "preprocessing.normalize.divisor")
        if d == 0:
            ck.fail("preprocessing.normalize.divisor", "must not be 0")


def validate_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """Raise BundleError naming the first field of ``manifest`` we cannot use safely."""
    ck = _Checker(where)
    m = ck.obj(manifest, "the manifest")
    if m.get("format") != FORMAT_NAME:
        raise BundleError(f"{where} is not an attunet-deploy manifest; re-export the bundle")
    version = m.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"{where} has schema version {repr(version)[:20]}; this attunet-deploy reads version "
                          f"{SCHEMA_VERSION}: re-export with this version")
    model = ck.obj(m.get("model"), "model")
    cfg = ck.obj(model.get("config"), "model.config")
    cin = ck.int_(cfg.get("in_channels"), "model.config.in_channels", 1, _MAX_CHANNELS)
    cout = ck.int_(cfg.get("out_channels"), "model.config.out_channels", 1, _MAX_CHANNELS)
    ck.int_(cfg.get("base_channels"), "model.config.base_channels", 1, _MAX_CHANNELS)
    ck.obj(model.get("source", {}), "model.source")
    inp = ck.obj(m.get("input"), "input")
    if ck.int_(inp.get("channels"), "input.channels", 1, _MAX_CHANNELS) != cin:
        ck.fail("input.channels", f"disagrees with model.config.in_channels ({cin})")
    ck.int_(inp.get("spatial_divisor", 16), "input.spatial_divisor", 1, 1024)
    out = ck.obj(m.get("output"), "output")
    if ck.int_(out.get("channels"), "output.channels", 1, _MAX_CHANNELS) != cout:
        ck.fail("output.channels", f"disagrees with model.config.out_channels ({cout})")
    validate_preprocessing(m.get("preprocessing"), cin, ck)
    post = ck.obj(m.get("postprocessing"), "postprocessing")
    if post.get("kind") == "sigmoid_threshold":
        ck.num(post.get("threshold", 0.5), "postprocessing.threshold", lo=0.0, hi=1.0, lo_open=True)
        if post.get("threshold", 0.5) == 1.0:
            ck.fail("postprocessing.threshold", "must be below 1")
    elif post.get("kind") != "argmax":
        ck.fail("postprocessing.kind", "must be sigmoid_threshold or argmax")
    arts = ck.obj(m.get("artifacts"), "artifacts")
    for name, entry in arts.items():
        check_artifact_name(name)
        e = ck.obj(entry, f"artifacts[{name!r}]")
        ck.str_(e.get("kind"), f"artifacts[{name!r}].kind")
        if not isinstance(e.get("sha256"), str) or not _SHA256.match(e["sha256"]):
            ck.fail(f"artifacts[{name!r}].sha256", "must be 64 lowercase hex digits")
        ck.int_(e.get("bytes"), f"artifacts[{name!r}].bytes")
        if "precision" in e and e["precision"] not in PRECISIONS:
            ck.fail(f"artifacts[{name!r}].precision", f"must be one of {', '.join(PRECISIONS)}")
        ck.obj(e.get("producer", {}), f"artifacts[{name!r}].producer")
        if e.get("kind") == "tensorrt-engine":
            ck.obj(e.get("gpu"), f"artifacts[{name!r}].gpu")
            ck.str_(e.get("tensorrt"), f"artifacts[{name!r}].tensorrt")
            profiles = e.get("profiles")
            if not isinstance(profiles, list) or not profiles:
                ck.fail(f"artifacts[{name!r}].profiles", "must be a non-empty list")
            for p in profiles:
                p = ck.obj(p, f"artifacts[{name!r}].profiles[]")
                for key in ("min", "opt", "max"):
                    dims = p.get(key)
                    if not isinstance(dims, list) or len(dims) != 4:
                        ck.fail(f"artifacts[{name!r}].profiles[].{key}", "must be 4 integers")
                    for d in dims:
                        ck.int_(d, f"artifacts[{name!r}].profiles[].{key}", 1, 1 << 20)
    ck.obj(m.setdefault("verification", {}), "verification")
    for key, row in m["verification"].items():
        ck.obj(row, f"verification[{str(key)[:40]!r}]")
    if "golden" in m:
        g = ck.obj(m["golden"], "golden")
        src = g.get("source", [])
        if not isinstance(src, list):
            ck.fail("golden.source", "must be a list")
        for s in src:
            ck.obj(s, "golden.source[]")
    return m


# ====================================================================================== locks
def _dir_lock(root: Path, exclusive: bool) -> contextlib.AbstractContextManager[None]:
    """flock on the bundle directory: shared for readers, exclusive while a commit renames."""
    return dir_lock(root, exclusive)


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


# ====================================================================================== reading
def _hash_artifact(path: Path, expected_bytes: int) -> str:
    """sha256 of a regular file of exactly ``expected_bytes`` (never follows a FIFO or device)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path} is not a regular file; bundles hold plain files")
        if st.st_size != expected_bytes:
            raise BundleError(f"{path} is {st.st_size} bytes, the manifest says {expected_bytes} "
                              f"(truncated or replaced): re-create it with {_remedy(path.name)}")
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}): run 'attdeploy export MODEL -o {root}'") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{mpath} is not a regular file; re-export the bundle")
    try:
        raw = limits.read_bounded(mpath, limits.MANIFEST, "manifest")
    except InputError as exc:
        raise BundleError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{mpath} is not UTF-8 text; re-export the bundle") from None
    if not limits.json_depth_ok(text):
        raise BundleError(f"{mpath} nests deeper than {limits.JSON_DEPTH.describe()}: not a manifest we wrote; "
                          "re-export the bundle")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{mpath} is unreadable ({str(exc)[:120]}); re-export the bundle") from None


def is_bundle_dir(path: Path) -> bool:
    """True when ``path`` holds a manifest with our format and schema version (nothing else counts)."""
    try:
        m = _read_manifest(path)
    except BundleError:
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT_NAME and m.get("schema_version") == SCHEMA_VERSION


class Bundle:
    """A bundle directory and its validated manifest (a plain dict, schema version 1).

    ``overlay`` maps artifact names to staged files of an uncommitted :class:`Transaction`, so
    runners can check new artifacts before they are committed.
    """

    def __init__(self, root: str | os.PathLike[str], manifest: dict[str, Any],
                 overlay: dict[str, Path] | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.overlay = overlay or {}
        #: the manifest as read from disk by :meth:`load` (a writer checks it has not changed since)
        self.loaded: dict[str, Any] | None = None

    # ----------------------------------------------------------------- creation / loading
    @staticmethod
    def new_manifest(*, config: dict[str, int], preprocessing: dict[str, Any], postprocessing: dict[str, Any],
                     source: dict[str, Any], spatial_divisor: int = 16) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": now_iso(),
            "updated": now_iso(),
            "model": {"architecture": "AttentionUNet", "config": dict(config), "source": source},
            "input": {"name": "image", "layout": "NCHW", "channels": config["in_channels"],
                      "dtype": "float32", "spatial_divisor": spatial_divisor,
                      "dynamic_axes": ["N", "H", "W"]},
            "output": {"name": "logits", "channels": config["out_channels"], "dtype": "float32"},
            "preprocessing": preprocessing,
            "postprocessing": postprocessing,
            "artifacts": {},
            "verification": {},
        }

    @classmethod
    def load(cls, root: str | os.PathLike[str], check_hashes: bool = True) -> Bundle:
        """Read and validate a bundle: manifest schema, artifact names, size and sha256 of each."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"no bundle at {root}: run 'attdeploy export MODEL -o {root}' first")
        _recover_if_needed(root)
        with _dir_lock(root, exclusive=False):
            manifest = validate_manifest(_read_manifest(root), root / MANIFEST)
            bundle = cls(root, manifest)
            bundle.loaded = copy.deepcopy(manifest)
            if check_hashes:
                bundle.check_artifacts()
        return bundle

    def check_artifacts(self) -> None:
        """Raise BundleError naming the first artifact whose file differs from the manifest."""
        for name, entry in self.artifacts.items():
            path = self.path(name)
            if not os.path.lexists(path):
                continue  # copied without it (e.g. no weights.pt on a device): fails on use
            if _hash_artifact(path, entry["bytes"]) != entry["sha256"]:
                raise BundleError(f"{path} does not match its sha256 in the manifest (modified or "
                                  f"replaced): re-create it with {_remedy(name)}")

    def read_artifact(self, name: str) -> bytes:
        """The bytes of artifact ``name``, checked against the manifest's sha256 as they are read.

        Runners load from these bytes, so what runs is exactly what was hashed even if another
        command commits a new version in between.
        """
        path = self.require(name)
        entry = self.artifacts[name]
        with _dir_lock(self.root, exclusive=False):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != entry["bytes"]:
                    self._changed_or_damaged(name)
                chunks = []
                while block := os.read(fd, 1 << 24):
                    chunks.append(block)
                data = b"".join(chunks)
            finally:
                os.close(fd)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self._changed_or_damaged(name)
        return data

    def _changed_or_damaged(self, name: str) -> None:
        if name not in self.overlay:
            try:
                current = _read_manifest(self.root)
            except BundleError:
                current = None
            if isinstance(current, dict) and current.get("artifacts", {}).get(name) != self.artifacts.get(name):
                raise BundleError(f"bundle {self.root} was changed by another command while this one ran "
                                  f"({name} was replaced): run the command again")
        raise BundleError(f"{self.path(name)} does not match its sha256 in the manifest (modified or replaced): "
                          f"re-create it with {_remedy(name)}")

    # ----------------------------------------------------------------- accessors
    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.manifest["artifacts"]

    @property
    def config(self) -> dict[str, int]:
        return self.manifest["model"]["config"]

    @property
    def in_channels(self) -> int:
        return int(self.manifest["input"]["channels"])

    @property
    def out_channels(self) -> int:
        return int(self.manifest["output"]["channels"])

    @property
    def divisor(self) -> int:
        return int(self.manifest["input"].get("spatial_divisor", 16))

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.manifest["preprocessing"]

    @property
    def postprocessing(self) -> dict[str, Any]:
        return self.manifest["postprocessing"]

    @property
    def golden_info(self) -> dict[str, Any]:
        return self.manifest.get("golden") or {}

    def path(self, name: str) -> Path:
        """Where artifact ``name`` lives (its staged copy inside an uncommitted transaction)."""
        if name in self.overlay:
            return self.overlay[name]
        return _inside(self.root, check_artifact_name(name))

    def has(self, name: str) -> bool:
        return name in self.artifacts and self.path(name).is_file()

    def require(self, name: str) -> Path:
        """Path of a listed artifact that exists, else a BundleError saying how to make it."""
        if name not in self.artifacts:
            raise BundleError(f"bundle {self.root} has no {name}: create it with {_remedy(name)}")
        path = self.path(name)
        if not os.path.lexists(path):
            raise BundleError(f"{path} is listed in the manifest but missing: copy it along or "
                              f"re-create it with {_remedy(name)}")
        return path

    def onnx_path(self, precision: str) -> Path:
        if precision not in ONNX_FILES:
            raise BundleError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        return self.require(ONNX_FILES[precision])

    # ----------------------------------------------------------------- writing
    def transaction(self) -> Transaction:
        """Begin a write: takes the writer lock (BundleError 'busy' if held), rolls forward or
        clears what a killed writer left, and stages changes until :meth:`Transaction.commit`."""
        return Transaction(self.root, self.manifest, expect=self.loaded)


def _remedy(name: str) -> str:
    if name in (ONNX_FILES["fp16"], ONNX_FILES["int8"]):
        return "'attdeploy quantize'"
    if name.startswith(ENGINE_DIR + "/"):
        return "'attdeploy build' on this device"
    return "'attdeploy export'"


# ====================================================================================== transactions
_JOURNAL = "journal.json"


class Transaction:
    """Staged changes to one bundle, committed together with the manifest at the end.

    Use as a context manager: leaving the block with an exception (including Ctrl-C) discards
    everything; :meth:`commit` applies it. Staged files live in ``.attdeploy/txn-*`` inside
    the bundle (same filesystem, so the commit is a series of renames).
    """

    def __init__(self, root: Path, manifest: dict[str, Any], *, created_root: bool = False,
                 expect: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.lock = WriterLock(self.root).acquire()
        try:
            _recover(self.root)
            if expect is not None and validate_manifest(_read_manifest(self.root), self.root / MANIFEST) != expect:
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
        if not _OWNED_UNLISTED.match(name):
            check_artifact_name(name)
        path = self.staging / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writes[name] = path
        self.deletes.discard(name)
        return path

    def add_artifact(self, name: str, *, kind: str, precision: str | None = None,
                     producer: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """List staged file ``name`` in the new manifest (size and sha256 of the staged bytes)."""
        path = self.writes.get(name)
        if path is None or not path.is_file():
            raise BundleError(f"internal: {name} was not staged before add_artifact")
        from .fileio import sha256_file

        entry: dict[str, Any] = {"kind": kind}
        if precision is not None:
            entry["precision"] = precision
        entry.update({"sha256": sha256_file(path), "bytes": path.stat().st_size, "created": now_iso(),
                      "producer": producer or {}})
        entry.update(extra)
        self.manifest["artifacts"][name] = entry
        if kind == "onnx" and precision is not None:
            # Records judged the graph this one replaces: they say nothing about the new one.
            for key, row in list(self.manifest["verification"].items()):
                if isinstance(row, dict) and row.get("precision") == precision:
                    del self.manifest["verification"][key]
        return entry

    def remove(self, name: str) -> None:
        """Unlist ``name``; its file is deleted on commit if it was ours (listed before)."""
        self.manifest["artifacts"].pop(name, None)
        self.writes.pop(name, None)
        if name in self.old_artifacts or _OWNED_UNLISTED.match(name):
            self.deletes.add(name)

    def remove_dir(self, rel: str) -> None:
        """Delete a folder we own inside the bundle (e.g. an engine cache) on commit."""
        if not rel.startswith(ENGINE_DIR + "/"):
            raise BundleError(f"internal: refusing to delete {rel} (not under {ENGINE_DIR}/)")
        check_artifact_name(rel)
        self.delete_dirs.add(rel)

    def record_verification(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.manifest["verification"][f"{row['backend']}/{row['precision']}"] = {**row, "time": now_iso()}

    def view(self) -> Bundle:
        """The bundle as it will be after commit (staged files served from staging)."""
        return Bundle(self.root, self.manifest, overlay={n: p for n, p in self.writes.items()
                                                         if n in self.manifest["artifacts"]})

    # ----------------------------------------------------------------- commit / abort
    def commit(self) -> None:
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
                    _remove_if_only_internal(self.root)
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
    held: list[int] = []
    old: dict[int, Any] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda signum, frame: held.append(signum))
    except (ValueError, OSError):
        for s, h in old.items():
            signal.signal(s, h)
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            signal.raise_signal(held[0])  # the restored handler runs now, after the block


def _apply(root: Path, staging: Path) -> None:
    """Carry out a journalled commit (idempotent: resumes where a killed commit stopped)."""
    journal = json.loads((staging / _JOURNAL).read_text(encoding="utf-8"))
    with _dir_lock(root, exclusive=True):
        for name in journal["writes"]:
            src = staging / "files" / name
            dst = _inside(root, name)
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
        for name in journal["deletes"]:
            dst = _inside(root, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(dst).st_mode):
                    dst.unlink()
        for rel in journal["delete_dirs"]:
            dst = _inside(root, rel)
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


def _recover_if_needed(root: Path) -> None:
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


def _remove_if_only_internal(root: Path) -> None:
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    if all(e.name == INTERNAL_DIR for e in entries):
        shutil.rmtree(root / INTERNAL_DIR, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()


# ====================================================================================== export target
def check_export_target(out: str | os.PathLike[str], force: bool, writes: list[str]) -> tuple[Path, str]:
    """Resolve and classify export's ``-o`` without changing anything: (bundle root, mode).

    Mode is 'new' (missing or empty), 'replace' (one of our bundles) or 'into' (a foreign
    folder, only with ``force``, and only if none of ``writes`` exists there: we never
    overwrite what we did not make).
    """
    raw = Path(out)
    if str(out).strip() == "":
        raise InputError("-o needs a directory name")
    root = raw.resolve()  # '-o .' and '-o link-to-bundle' both mean the real folder
    if root.exists() and not root.is_dir():
        raise BundleError(f"{raw} exists and is not a directory: choose another -o")
    if not root.exists():
        return root, "new"
    try:
        entries = [e.name for e in root.iterdir() if e.name != INTERNAL_DIR]
    except OSError as exc:
        raise BundleError(f"cannot read {raw}: {exc.strerror or exc}") from None
    if not entries:
        return root, "new"
    if is_bundle_dir(root):
        return root, "replace"
    if not force:
        raise BundleError(f"{raw} is not empty and not a bundle (no attunet-deploy manifest): choose another -o, or "
                          "pass --force to add the bundle's files to it (nothing of yours is overwritten)")
    clash = [n for n in [MANIFEST, *writes, *REPORT_FILES] if os.path.lexists(root / n)]
    if clash:
        raise BundleError(f"{raw / clash[0]} exists and was not made by attdeploy: --force writes only "
                          "into folders where it overwrites nothing; move it away or choose another -o")
    return root, "into"


def open_export_target(out: str | os.PathLike[str], force: bool, writes: list[str]) -> tuple[Path, str, Transaction]:
    """:func:`check_export_target`, then begin export's transaction on that folder (created if
    missing, and removed again if the export does not commit)."""
    root, mode = check_export_target(out, force, writes)
    created = False
    if not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise BundleError(f"cannot create {out}: {exc.strerror or exc}") from None
        created = True
    old_manifest: dict[str, Any] = {"artifacts": {}}
    if mode == "replace":
        try:
            old_manifest = validate_manifest(_read_manifest(root), root / MANIFEST)
        except BundleError:
            old_manifest = {"artifacts": {}}  # ours but damaged: replace what we can name
    try:
        txn = Transaction(root, {"artifacts": {}}, created_root=created)
    except BaseException:
        if created:
            _remove_if_only_internal(root)
        raise
    txn.old_artifacts = {n for n in old_manifest.get("artifacts", {}) if _safe_name(n)}
    if mode == "replace":
        txn.deletes.update(txn.old_artifacts)  # superseded unless the new export writes it again
        txn.deletes.update(REPORT_FILES)
        clash = [n for n in writes if os.path.lexists(root / n) and n not in txn.old_artifacts]
        if clash:
            txn.abort()
            raise BundleError(f"{root / clash[0]} is in the bundle folder but not listed in its manifest: move it "
                              "away first (attdeploy replaces only files it made)")
    return root, mode, txn


def _safe_name(name: Any) -> bool:
    try:
        check_artifact_name(name)
    except BundleError:
        return False
    return True
