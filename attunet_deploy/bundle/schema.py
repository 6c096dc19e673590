"""The bundle's file names and the manifest schema: each section validated by its own function.

A damaged or hostile manifest is a one-line ``BundleError`` naming the field (docs/design.md, 5a).
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, NoReturn

from attunet_deploy import limits
from attunet_deploy.bundle.spec import NORMALIZE_KINDS, Postprocessing, SlidingWindow, check_segment_text
from attunet_deploy.errors import BundleError, InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
#: The manifest JSON document as read from or written to manifest.json. Only bundle/ holds it: every
#: other module reads the typed spec (``bundle/spec.py``) and the Bundle's accessors.
Manifest = dict[str, Any]
FORMAT_NAME = "attunet-deploy-bundle"
PRECISIONS = ("fp32", "fp16", "int8")
#: Model families a bundle can hold (models/): the 2D AttU_Net, the paper's 3D networks, MONAI's AttentionUnet.
FAMILIES = ("attunet2d", "oktay3d", "monai")
#: ``model.architecture`` written for each family (readers go by ``model.family``).
ARCHITECTURES = {"attunet2d": "AttentionUNet", "oktay3d": "Oktay3D", "monai": "monai.AttentionUnet"}
#: Input layouts: 2D slices, or 3D volumes run through a sliding window.
LAYOUTS = ("NCHW", "NCDHW")


class ArtifactKind(str, enum.Enum):
    """What an artifact is (``artifacts[name].kind`` in the manifest)."""

    ONNX = "onnx"
    WEIGHTS = "pytorch-weights"
    TORCHSCRIPT = "torchscript"
    GOLDEN = "golden"
    SELFCHECK = "self-check"  # one golden input and its reference logits, run by every runner on activation
    ENGINE = "tensorrt-engine"
    OPENVINO_IR = "openvino-ir"  # an OpenVINO-native graph (.xml) ...
    OPENVINO_WEIGHTS = "openvino-weights"  # ... and its weights (.bin)

    def __str__(self) -> str:
        return self.value



#: Artifact file for each precision's ONNX graph.
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: NNCF's OpenVINO-native INT8 graph and its weights (build/ov_int8.py), run by ``ov/int8`` when present.
OV_INT8_XML, OV_INT8_BIN = "model.int8.ov.xml", "model.int8.ov.bin"
WEIGHTS_FILE = "weights.pt"
TORCHSCRIPT_FILE = "model.ts"
GOLDEN_FILE = "golden.npz"
SELFCHECK_FILE = "selfcheck.npz"
ENGINE_DIR = "engines"
#: Our private folder inside a bundle: the writer lock and transaction staging. Never an artifact.
INTERNAL_DIR = ".attdeploy"
#: Files we write into a bundle without listing them (derived, human-facing or caches).
REPORT_FILES = ("report.md", "report.json")
OWNED_UNLISTED = re.compile(r"^(report\.md|report\.json|engines/timing-trt[0-9A-Za-z.+-]+\.cache)$")
#: One path component of an artifact name: starts with a letter or digit, no separators.
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,159}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
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


def inside_bundle(root: Path, name: str) -> Path:
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

    def fail(self, field: str, problem: str) -> NoReturn:
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
    if "spacing" in pre:
        spacing = pre["spacing"]
        if not isinstance(spacing, list) or len(spacing) != 3:
            ck.fail("preprocessing.spacing", "must be a list of 3 numbers (z, y, x) in mm")
        for v in spacing:
            ck.num(v, "preprocessing.spacing[]", lo=0.0, hi=1000.0, lo_open=True)
    norm = ck.obj(pre.get("normalize", {"kind": "none"}), "preprocessing.normalize")
    kind = norm.get("kind", "none")
    if kind not in NORMALIZE_KINDS:
        ck.fail("preprocessing.normalize.kind", f"{str(kind)[:40]!r} is not one of {', '.join(NORMALIZE_KINDS)}")
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


def validate_manifest(manifest: Any, where: Path) -> Manifest:
    """Raise BundleError naming the first field of ``manifest`` we cannot use safely."""
    ck = _Checker(where)
    m = ck.obj(manifest, "the manifest")
    if m.get("format") != FORMAT_NAME:
        raise BundleError(f"{where} is not an attunet-deploy manifest; re-export the bundle")
    version = m.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"{where} has schema version {repr(version)[:20]}; this attunet-deploy reads version "
                          f"{SCHEMA_VERSION}: re-export with this version")
    cin = validate_model_io(m, ck)
    validate_preprocessing(m.get("preprocessing"), cin, ck)
    validate_postprocessing(m.get("postprocessing"), ck)
    validate_cleanup(m, ck)
    if "input_profile" in m:
        ck.obj(m["input_profile"], "input_profile")  # read leniently: it only flags results for review
    arts = ck.obj(m.get("artifacts"), "artifacts")
    for name, entry in arts.items():
        validate_artifact(name, entry, ck)
    ck.obj(m.setdefault("verification", {}), "verification")
    for key, row in m["verification"].items():
        ck.obj(row, f"verification[{str(key)[:40]!r}]")
    if "golden" in m:
        validate_golden(m["golden"], ck)
    return m


def validate_model_io(m: Manifest, ck: _Checker) -> int:
    """The ``model``, ``input`` and ``output`` sections; returns the input channel count."""
    model = ck.obj(m.get("model"), "model")
    family = model.get("family", "attunet2d")
    if family not in FAMILIES:
        ck.fail("model.family", f"{str(family)[:40]!r} is not one of {', '.join(FAMILIES)}")
    cfg = ck.obj(model.get("config"), "model.config")
    cin = ck.int_(cfg.get("in_channels"), "model.config.in_channels", 1, _MAX_CHANNELS)
    cout = ck.int_(cfg.get("out_channels"), "model.config.out_channels", 1, _MAX_CHANNELS)
    if family == "attunet2d":
        ck.int_(cfg.get("base_channels"), "model.config.base_channels", 1, _MAX_CHANNELS)
    ck.obj(model.get("source", {}), "model.source")
    inp = ck.obj(m.get("input"), "input")
    if ck.int_(inp.get("channels"), "input.channels", 1, _MAX_CHANNELS) != cin:
        ck.fail("input.channels", f"disagrees with model.config.in_channels ({cin})")
    layout = inp.get("layout", "NCHW")
    if layout not in LAYOUTS:
        ck.fail("input.layout", f"{str(layout)[:20]!r} is not one of {', '.join(LAYOUTS)}")
    divisors = _divisors(inp.get("spatial_divisor", 16), len(layout) - 2, ck)
    out = ck.obj(m.get("output"), "output")
    if ck.int_(out.get("channels"), "output.channels", 1, _MAX_CHANNELS) != cout:
        ck.fail("output.channels", f"disagrees with model.config.out_channels ({cout})")
    window = ck.obj(m.get("inference", {}), "inference").get("sliding_window")
    if window is not None or layout == "NCDHW":
        validate_sliding_window(window, divisors, ck)
    return cin


def _divisors(value: Any, spatial_dims: int, ck: _Checker) -> tuple[int, ...]:
    """``input.spatial_divisor``: one int for every spatial axis (2D bundles), or one per axis."""
    if isinstance(value, list):
        if len(value) != spatial_dims:
            ck.fail("input.spatial_divisor", f"must hold {spatial_dims} numbers, one per spatial axis")
        return tuple(ck.int_(v, "input.spatial_divisor[]", 1, 1024) for v in value)
    return (ck.int_(value, "input.spatial_divisor", 1, 1024),) * spatial_dims


def validate_sliding_window(window: Any, divisors: tuple[int, ...], ck: _Checker) -> None:
    """``inference.sliding_window`` of a 3D bundle: roi (a multiple of the divisor on every axis),
    overlap in [0, 1), mode, sigma_scale and windows per call."""
    w = ck.obj(window, "inference.sliding_window")
    roi = w.get("roi")
    if not isinstance(roi, list) or len(roi) != len(divisors):
        ck.fail("inference.sliding_window.roi", f"must be a list of {len(divisors)} integers (D, H, W)")
    for r, d in zip(roi, divisors):
        if ck.int_(r, "inference.sliding_window.roi[]", 1, 4096) % d:
            ck.fail("inference.sliding_window.roi", f"{roi} must be a multiple of {list(divisors)} on every axis")
    try:
        SlidingWindow.from_dict(w)  # the one statement of its defaults and ranges
    except (InputError, TypeError, ValueError) as exc:
        ck.fail("inference.sliding_window", str(exc))


#: Classes a manifest may name (a SEG's segment numbers are 1..65535; no model here has more classes).
MAX_SEGMENTS = 1024


def validate_postprocessing(post: Any, ck: _Checker) -> None:
    post = ck.obj(post, "postprocessing")
    try:
        Postprocessing.from_dict({k: v for k, v in post.items() if k != "segments"})
    except (InputError, TypeError, ValueError) as exc:
        ck.fail("postprocessing", str(exc))
    segments = post.get("segments", [])
    if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
        ck.fail("postprocessing.segments", f"must be a list of at most {MAX_SEGMENTS} segments")
    for i, entry in enumerate(segments):
        try:
            check_segment_text(entry, MAX_SEGMENTS, f"postprocessing.segments[{i}]")
        except InputError as exc:
            ck.fail(f"postprocessing.segments[{i}]", str(exc).split(": ", 1)[-1])


def validate_cleanup(m: Manifest, ck: _Checker) -> None:
    """``postprocessing.keep_largest`` names the model's classes; ``min_component_ml`` needs a 3D bundle
    with a spacing (a component's volume is measured on the model's grid)."""
    post = m["postprocessing"]
    cout = m["model"]["config"]["out_channels"]
    top = 1 if cout <= 2 else cout - 1
    keep = post.get("keep_largest", [])
    if not isinstance(keep, list) or any(not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= top
                                         for c in keep):
        ck.fail("postprocessing.keep_largest", f"must list classes in 1..{top}")
    if post.get("min_component_ml") is not None and not (m["input"].get("layout") == "NCDHW"
                                                         and "spacing" in m["preprocessing"]):
        ck.fail("postprocessing.min_component_ml", "needs a 3D bundle with a spacing")


def validate_artifact(name: Any, entry: Any, ck: _Checker) -> None:
    """One ``artifacts`` entry: a safe name, kind, sha256, size, precision; engines their GPU and profiles."""
    check_artifact_name(name)
    e = ck.obj(entry, f"artifacts[{name!r}]")
    ck.str_(e.get("kind"), f"artifacts[{name!r}].kind")
    if not isinstance(e.get("sha256"), str) or not _SHA256.match(e["sha256"]):
        ck.fail(f"artifacts[{name!r}].sha256", "must be 64 lowercase hex digits")
    ck.int_(e.get("bytes"), f"artifacts[{name!r}].bytes")
    if "precision" in e and e["precision"] not in PRECISIONS:
        ck.fail(f"artifacts[{name!r}].precision", f"must be one of {', '.join(PRECISIONS)}")
    ck.obj(e.get("producer", {}), f"artifacts[{name!r}].producer")
    if e.get("kind") != ArtifactKind.ENGINE:
        return
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


def validate_golden(golden: Any, ck: _Checker) -> None:
    g = ck.obj(golden, "golden")
    src = g.get("source", [])
    if not isinstance(src, list):
        ck.fail("golden.source", "must be a list")
    for s in src:
        ck.obj(s, "golden.source[]")


def read_manifest(root: Path) -> Manifest:
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
        m = read_manifest(path)
    except BundleError:
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT_NAME and m.get("schema_version") == SCHEMA_VERSION
