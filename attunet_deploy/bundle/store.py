"""Reading a bundle: :class:`Bundle`, its validated manifest and hash-checked artifacts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from attunet_deploy.bundle.profile import InputProfile
from attunet_deploy.bundle.schema import (
    ARCHITECTURES,
    ENGINE_DIR,
    FORMAT_NAME,
    MANIFEST,
    ONNX_FILES,
    PRECISIONS,
    SCHEMA_VERSION,
    Manifest,
    check_artifact_name,
    inside_bundle,
    now_iso,
    read_manifest,
    validate_manifest,
)
from attunet_deploy.bundle.spec import (
    ArtifactEntry,
    GoldenInfo,
    ModelSource,
    ModelSpec,
    SlidingWindow,
    spec_of,
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

    def __init__(self, root: str | os.PathLike[str], manifest: Manifest,
                 overlay: dict[str, Path] | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.overlay = overlay or {}
        #: the manifest as read from disk by :meth:`load` (a writer checks it has not changed since)
        self.loaded: Manifest | None = None

    # ----------------------------------------------------------------- creation / loading
    @staticmethod
    def new_manifest(*, config: dict[str, Any], spec: ModelSpec, source: dict[str, Any],
                     family: str = "attunet2d") -> Manifest:
        """A manifest for a new bundle (``spec``: layout, divisors, normalisation, post-processing, and
        for 3D families the sliding window and spacing)."""
        three_d = spec.sliding_window is not None
        divs = spec.input.divisors
        spatial_divisor: int | list[int] = list(divs) if three_d else divs[-1]
        preprocessing: dict[str, object] = {"normalize": spec.normalization.to_dict()}
        if spec.spacing is not None:
            preprocessing["spacing"] = list(spec.spacing)
        manifest: Manifest = {
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
            "postprocessing": spec.postprocessing.to_dict(),
            "artifacts": {},
            "verification": {},
        }
        if spec.sliding_window is not None:
            manifest["inference"] = {"sliding_window": spec.sliding_window.to_dict()}
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
            if _hash_artifact(path, entry.bytes) != entry.sha256:
                raise BundleError(f"{path} does not match its sha256 in the manifest (modified or "
                                  f"replaced): re-create it with {_remedy(name)}")

    def read_artifact(self, name: str) -> bytes:
        """The bytes of artifact ``name``, checked against the manifest's sha256 as they are read.

        Runners load from these bytes, so what runs is exactly what was hashed even if another
        command commits a new version in between.
        """
        path = self.require(name)
        entry = self.manifest["artifacts"][name]
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
            if isinstance(current, dict) and current.get("artifacts",
                                                         {}).get(name) != self.manifest["artifacts"].get(name):
                raise BundleError(f"bundle {self.root} was changed by another command while this one ran "
                                  f"({name} was replaced): run the command again")
        raise BundleError(f"{self.path(name)} does not match its sha256 in the manifest (modified or replaced): "
                          f"re-create it with {_remedy(name)}")

    # ----------------------------------------------------------------- accessors
    @functools.cached_property
    def spec(self) -> ModelSpec:
        """How this bundle's graphs turn raw images into masks (parsed once from the manifest)."""
        return spec_of(self.manifest)

    @property
    def artifacts(self) -> dict[str, ArtifactEntry]:
        """Every listed artifact, by name."""
        return {name: ArtifactEntry.from_dict(name, entry) for name, entry in self.manifest["artifacts"].items()}

    def artifact(self, name: str) -> ArtifactEntry | None:
        entry = self.manifest["artifacts"].get(name)
        return ArtifactEntry.from_dict(name, entry) if entry is not None else None

    def sha256(self, name: str) -> str | None:
        """The recorded sha256 of artifact ``name`` (None when it is not listed)."""
        entry = self.manifest["artifacts"].get(name)
        return str(entry["sha256"]) if entry is not None else None

    @property
    def config(self) -> dict[str, Any]:
        """The model family's constructor arguments, as recorded."""
        return dict(self.manifest["model"]["config"])

    @property
    def source(self) -> ModelSource:
        return ModelSource.from_dict(self.manifest["model"].get("source"))

    @property
    def is_demo(self) -> bool:
        return self.source.demo

    @property
    def in_channels(self) -> int:
        return self.spec.input.channels

    @property
    def out_channels(self) -> int:
        return self.spec.input.out_channels

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
            text += f" · {self.layout}, {window.describe()}"
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
    def architecture(self) -> str:
        return str(self.manifest["model"].get("architecture", "AttentionUNet"))

    @property
    def layout(self) -> str:
        return self.spec.input.layout

    @property
    def spatial_dims(self) -> int:
        """2 for slices ([N, C, H, W]), 3 for volumes ([N, C, D, H, W])."""
        return self.spec.input.spatial_dims

    @property
    def divisors(self) -> tuple[int, ...]:
        """What each spatial axis is padded up to a multiple of (one int in 2D manifests: both axes)."""
        return self.spec.input.divisors

    @property
    def divisor(self) -> int:
        """The in-plane (W) divisor; 2D bundles use the same one on H."""
        return self.spec.input.divisor

    @property
    def sliding_window(self) -> SlidingWindow | None:
        """3D bundles: roi, overlap, mode, sigma_scale and batch of the runners' sliding window."""
        return self.spec.sliding_window

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The voxel spacing (z, y, x) in mm that volumes are resampled to before inference, if any."""
        return self.spec.spacing

    @property
    def golden(self) -> GoldenInfo:
        """Where the golden set came from."""
        return GoldenInfo.from_dict(self.manifest.get("golden"))

    @property
    def input_profile(self) -> InputProfile:
        """What the images this bundle was verified (and calibrated) on looked like."""
        return InputProfile.from_dict(self.manifest.get("input_profile"))

    def verification_records(self) -> dict[str, dict[str, Any]]:
        """The last passing verification of each backend/precision, as recorded (JSON rows)."""
        return {str(k): dict(v) for k, v in self.manifest.get("verification", {}).items() if isinstance(v, dict)}

    def report_header(self) -> dict[str, Any]:
        """What report.json repeats of the manifest: the model, its preprocessing, the golden set."""
        return copy.deepcopy({"model": self.manifest["model"], "preprocessing": self.manifest["preprocessing"],
                              "golden": self.manifest.get("golden", {})})

    def manifest_copy(self) -> Manifest:
        """The whole manifest as JSON data (``info --json``)."""
        return copy.deepcopy(self.manifest)

    def path(self, name: str) -> Path:
        """Where artifact ``name`` lives (its staged copy inside an uncommitted transaction)."""
        if name in self.overlay:
            return self.overlay[name]
        return inside_bundle(self.root, check_artifact_name(name))

    def has(self, name: str) -> bool:
        return name in self.manifest["artifacts"] and self.path(name).is_file()

    def lists(self, name: str) -> bool:
        """True when the manifest lists ``name`` (its file may have been left behind on a copy)."""
        return name in self.manifest["artifacts"]

    def require(self, name: str) -> Path:
        """Path of a listed artifact that exists, else a BundleError saying how to make it."""
        if name not in self.manifest["artifacts"]:
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
