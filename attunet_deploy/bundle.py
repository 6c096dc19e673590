"""The deployment bundle: a directory with ``manifest.json`` and the artifacts it lists.

Numpy-free and torch-free so that a device with only onnxruntime/tensorrt can read it.
Every artifact is listed with its sha256; :meth:`Bundle.load` checks them, so a truncated or
swapped file is reported instead of run. Updates are crash-safe: an artifact is dropped from
the manifest before its file is replaced and re-listed after, so a bundle interrupted at any
point still loads (the half-made artifact is simply not listed).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BundleError
from .fileio import atomic_path, sha256_file, write_json_atomic

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


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class Bundle:
    """A bundle directory and its manifest (a plain dict, schema version 1)."""

    def __init__(self, root: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest

    # ----------------------------------------------------------------- creation / loading
    @classmethod
    def new(cls, root: str | os.PathLike[str], *, config: dict[str, int], preprocessing: dict[str, Any],
            postprocessing: dict[str, Any], source: dict[str, Any], spatial_divisor: int = 16) -> Bundle:
        """An in-memory bundle (nothing written until :meth:`save`)."""
        manifest = {
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
        return cls(root, manifest)

    @classmethod
    def load(cls, root: str | os.PathLike[str], check_hashes: bool = True) -> Bundle:
        """Read and validate a bundle: schema version, and sha256 of every artifact present."""
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"no bundle at {root}: run 'attdeploy export MODEL -o {root}' first")
        if not mpath.is_file():
            raise BundleError(f"{root} is not a bundle (no {MANIFEST}): run 'attdeploy export MODEL -o {root}'")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath} is unreadable ({exc}); re-export the bundle") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise BundleError(f"{mpath} is not an attunet-deploy manifest; re-export the bundle")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{mpath} has schema version {version!r}; this attunet-deploy reads "
                              f"version {SCHEMA_VERSION}: re-export with this version")
        for key in ("model", "input", "output", "preprocessing", "postprocessing", "artifacts"):
            if key not in manifest:
                raise BundleError(f"{mpath} lacks '{key}'; re-export the bundle")
        manifest.setdefault("verification", {})
        bundle = cls(root, manifest)
        if check_hashes:
            bundle.check_artifacts()
        return bundle

    def check_artifacts(self) -> None:
        """Raise BundleError naming the first artifact whose file differs from the manifest."""
        for name, entry in self.artifacts.items():
            path = self.root / name
            if not path.exists():
                continue  # copied without it (e.g. no weights.pt on a device): fails on use
            size = path.stat().st_size
            if entry.get("bytes") is not None and size != entry["bytes"]:
                raise BundleError(f"{path} is {size} bytes, the manifest says {entry['bytes']} "
                                  f"(truncated or replaced): re-create it with {_remedy(name)}")
            if sha256_file(path) != entry.get("sha256"):
                raise BundleError(f"{path} does not match its sha256 in the manifest (modified or "
                                  f"replaced): re-create it with {_remedy(name)}")

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

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.artifacts and (self.root / name).is_file()

    def require(self, name: str) -> Path:
        """Path of a listed artifact that exists, else a BundleError saying how to make it."""
        if name not in self.artifacts:
            raise BundleError(f"bundle {self.root} has no {name}: create it with {_remedy(name)}")
        path = self.root / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in the manifest but missing: copy it along or "
                              f"re-create it with {_remedy(name)}")
        return path

    def onnx_path(self, precision: str) -> Path:
        if precision not in ONNX_FILES:
            raise BundleError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        return self.require(ONNX_FILES[precision])

    # ----------------------------------------------------------------- mutation
    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """Write artifact ``name``: yields a temp path; on success it is renamed into place.

        The old entry is dropped from the manifest first, so an interruption leaves a bundle
        that loads (without this artifact) rather than one whose hash check fails.
        """
        if name in self.artifacts and self.path(MANIFEST).exists():
            self.artifacts.pop(name)
            self.save()
        with atomic_path(self.root / name) as tmp:
            yield tmp

    def add_artifact(self, name: str, *, kind: str, precision: str | None = None,
                     producer: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """List an artifact that is already in place (hashes it) and save the manifest."""
        path = self.root / name
        entry: dict[str, Any] = {"kind": kind}
        if precision is not None:
            entry["precision"] = precision
        entry.update({"sha256": sha256_file(path), "bytes": path.stat().st_size,
                      "created": now_iso(), "producer": producer or {}})
        entry.update(extra)
        self.artifacts[name] = entry
        self.save()
        return entry

    def remove_artifact(self, name: str) -> None:
        if self.artifacts.pop(name, None) is not None:
            self.save()
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()

    def record_verification(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            key = f"{row['backend']}/{row['precision']}"
            self.manifest["verification"][key] = {**row, "time": now_iso()}
        self.save()

    def save(self) -> None:
        self.manifest["updated"] = now_iso()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / MANIFEST, self.manifest)


def _remedy(name: str) -> str:
    if name in (ONNX_FILES["fp16"], ONNX_FILES["int8"]):
        return "'attdeploy quantize'"
    if name.startswith(ENGINE_DIR + "/"):
        return "'attdeploy build' on this device"
    return "'attdeploy export'"


# --------------------------------------------------------------------- directory replacement
def is_bundle_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def check_output_dir(out: Path, force: bool) -> str:
    """Decide how export may write ``out``: 'new', 'replace' (a bundle) or 'into' (--force).

    Raises BundleError for a non-empty directory that is not a bundle, unless ``force``.
    """
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory: choose another -o")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if is_bundle_dir(out):
        return "replace"
    if force:
        return "into"
    raise BundleError(f"{out} is not empty and is not a bundle: choose another -o, or pass --force "
                      "to write the bundle's files into it")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def commit_staged(staging: Path, out: Path, mode: str) -> None:
    """Move a fully written staging bundle to ``out`` so readers see old or new, never a mix."""
    if mode == "new":
        if out.exists():
            out.rmdir()  # empty, checked by check_output_dir
        os.replace(staging, out)
        return
    if mode == "replace":
        if _exchange(staging, out):
            shutil.rmtree(staging)  # now holds the old bundle
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    # "into": a foreign non-empty directory with --force: copy our files, manifest last.
    for item in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
        target = out / item.name
        if item.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(item, target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(item, tmp)
    shutil.rmtree(staging)
