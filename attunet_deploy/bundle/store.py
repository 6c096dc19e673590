"""Reading a bundle: :class:`Bundle`, its validated manifest and hash-checked artifacts.
"""

from __future__ import annotations

import copy
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from attunet_deploy.bundle.schema import (
    ARCHITECTURES,
    ENGINE_DIR,
    FORMAT_NAME,
    MANIFEST,
    ONNX_FILES,
    PRECISIONS,
    SCHEMA_VERSION,
    check_artifact_name,
    inside_bundle,
    now_iso,
    read_manifest,
    validate_manifest,
)
from attunet_deploy.bundle.txn import Transaction, bundle_lock, recover_if_needed
from attunet_deploy.errors import BundleError, InputError


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
    def new_manifest(*, config: dict[str, Any], preprocessing: dict[str, Any], postprocessing: dict[str, Any],
                     source: dict[str, Any], spatial_divisor: int | list[int] = 16, family: str = "attunet2d",
                     sliding_window: dict[str, Any] | None = None) -> dict[str, Any]:
        """A manifest for a new bundle. 3D families (``layout`` NCDHW) take a divisor per spatial axis
        and the ``sliding_window`` settings their runners tile volumes with."""
        three_d = sliding_window is not None
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": now_iso(),
            "updated": now_iso(),
            "model": {"architecture": ARCHITECTURES.get(family, family), "family": family, "config": dict(config),
                      "source": source},
            "input": {"name": "image", "layout": "NCDHW" if three_d else "NCHW", "channels": config["in_channels"],
                      "dtype": "float32", "spatial_divisor": spatial_divisor,
                      "dynamic_axes": ["N", "D", "H", "W"] if three_d else ["N", "H", "W"]},
            "output": {"name": "logits", "channels": config["out_channels"], "dtype": "float32"},
            "preprocessing": preprocessing,
            "postprocessing": postprocessing,
            "artifacts": {},
            "verification": {},
        }
        if three_d:
            manifest["inference"] = {"sliding_window": dict(sliding_window or {})}
        return manifest

    @classmethod
    def load(cls, root: str | os.PathLike[str], check_hashes: bool = True) -> Bundle:
        """Read and validate a bundle: manifest schema, artifact names, size and sha256 of each."""
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"no bundle at {root}: run 'attdeploy export MODEL -o {root}' first")
        recover_if_needed(root)
        with bundle_lock(root, exclusive=False):
            manifest = validate_manifest(read_manifest(root), root / MANIFEST)
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
        with bundle_lock(self.root, exclusive=False):
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
                current = read_manifest(self.root)
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

    def describe_model(self) -> str:
        """One line: the architecture and the config that tells it apart (reports and ``info``)."""
        m = self.manifest["model"]
        cfg = m["config"]
        head = f"{m.get('architecture', 'AttentionUNet')} in={cfg['in_channels']} out={cfg['out_channels']}"
        if self.family == "attunet2d":
            return f"{head} base={cfg.get('base_channels', '?')}"
        extra = {"oktay3d": ("variant", "feature_scale"), "monai": ("channels", "strides")}[self.family]
        text = f"{head} " + " ".join(f"{k}={cfg.get(k)}" for k in extra)
        window = self.sliding_window
        if window is not None:
            roi = "x".join(map(str, window["roi"]))
            text += f" · {self.layout}, window {roi} (overlap {window.get('overlap', 0.5)}, {window.get('mode')})"
        if self.spacing is not None:
            text += f" · spacing {'x'.join(f'{v:g}' for v in self.spacing)} mm"
        return text

    def require_2d(self, what: str) -> None:
        """InputError for a 3D bundle where ``what`` handles 2D slices only (instead of running each
        slice as a one-slice volume)."""
        if self.spatial_dims != 2:
            raise InputError(f"{what} takes 2D bundles; this one is a 3D {self.family} bundle ({self.layout}): "
                             "segment volumes with load_runner(bundle).segment_volume(volume, spacing=...) "
                             "(3D at the scanner and in Triton comes next)")

    @property
    def family(self) -> str:
        return str(self.manifest["model"].get("family", "attunet2d"))

    @property
    def layout(self) -> str:
        return str(self.manifest["input"].get("layout", "NCHW"))

    @property
    def spatial_dims(self) -> int:
        """2 for slices ([N, C, H, W]), 3 for volumes ([N, C, D, H, W])."""
        return len(self.layout) - 2

    @property
    def divisors(self) -> tuple[int, ...]:
        """What each spatial axis is padded up to a multiple of (one int in 2D manifests: both axes)."""
        value = self.manifest["input"].get("spatial_divisor", 16)
        return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),) * self.spatial_dims

    @property
    def divisor(self) -> int:
        """The in-plane (W) divisor; 2D bundles use the same one on H."""
        return self.divisors[-1]

    @property
    def sliding_window(self) -> dict[str, Any] | None:
        """3D bundles: roi, overlap, mode, sigma_scale and batch of the runners' sliding window."""
        window = self.manifest.get("inference", {}).get("sliding_window")
        return dict(window) if isinstance(window, dict) else None

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The voxel spacing (z, y, x) in mm that volumes are resampled to before inference, if any."""
        value = self.manifest["preprocessing"].get("spacing")
        return (float(value[0]), float(value[1]), float(value[2])) if isinstance(value, list) else None

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
        return inside_bundle(self.root, check_artifact_name(name))

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
        return Transaction(self.root, self.manifest, bundle_type=type(self), expect=self.loaded)


def _remedy(name: str) -> str:
    if name in (ONNX_FILES["fp16"], ONNX_FILES["int8"]):
        return "'attdeploy quantize'"
    if name.startswith(ENGINE_DIR + "/"):
        return "'attdeploy build' on this device"
    return "'attdeploy export'"
