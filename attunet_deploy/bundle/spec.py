"""The bundle's typed spec: the manifest parsed once into frozen records.

Everything that decides *how a mask is made* (input layout and divisors, intensity normalisation,
voxel spacing, the sliding window, post-processing and the segments' names) lives here, with its
defaults stated once, in the dataclasses' fields. The manifest dict exists only where the file is
read or written (``schema``, ``store``, ``txn``); every other module reads these records.

No numpy, no other part of the package but ``errors``: the Triton python models ship this file
beside the Segmenter (``steps/triton_repo.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attunet_deploy.errors import InputError

#: Blending modes of the sliding window, as MONAI names them.
WINDOW_MODES = ("gaussian", "constant")
NORMALIZE_KINDS = ("none", "ct_window", "mean_std", "scale", "minmax")
POST_KINDS = ("sigmoid_threshold", "argmax")
#: DICOM value lengths of a segment's label (LO) and code parts (SH, SH, LO).
SEGMENT_TEXT_MAX = {"label": 64, "scheme": 16, "code": 16, "meaning": 64}


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# ====================================================================================== normalisation
@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation of raw images: ``none``, ``ct_window`` (level, width), ``mean_std``
    (per-channel mean and std, or one of each), ``scale`` (divisor) or ``minmax`` (per image and channel)."""

    kind: str = "none"
    level: float = 0.0
    width: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    divisor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Normalization:
        d = d or {}
        kind = str(d.get("kind", "none"))
        if kind == "ct_window":
            return cls(kind, level=float(d["level"]), width=float(d["width"]))
        if kind == "mean_std":
            return cls(kind, mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))
        if kind == "scale":
            return cls(kind, divisor=float(d["divisor"]))
        return cls(kind)

    def to_dict(self) -> dict[str, object]:
        if self.kind == "ct_window":
            return {"kind": self.kind, "level": self.level, "width": self.width}
        if self.kind == "mean_std":
            return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}
        if self.kind == "scale":
            return {"kind": self.kind, "divisor": self.divisor}
        return {"kind": self.kind}

    def describe(self) -> str:
        if self.kind == "ct_window":
            return f"CT window L{self.level:g}/W{self.width:g}"
        if self.kind == "mean_std":
            return f"(x - {list(self.mean)}) / {list(self.std)}"
        if self.kind == "scale":
            return f"x / {self.divisor:g}"
        return self.kind

    @property
    def unit_range(self) -> bool:
        """True when normalised values lie in [0, 1] (synthetic golden fields are squashed to match)."""
        return self.kind in ("ct_window", "scale", "minmax")

    @classmethod
    def parse(cls, spec: str | None) -> Normalization:
        """``none`` | ``ct-window:LEVEL,WIDTH`` | ``mean-std:MEAN,STD`` (per-channel values joined by
        ``/``, e.g. ``mean-std:0.485/0.456/0.406,0.229/0.224/0.225``) | ``scale:DIVISOR`` | ``minmax``."""
        if spec is None or spec.strip().lower() in ("", "none"):
            return cls()
        kind, _, args = spec.strip().partition(":")
        kind = kind.lower()

        def num(text: str) -> float:
            v = float(text)
            if not math.isfinite(v):
                raise ValueError
            return v

        try:
            if kind == "ct-window":
                level, width = (num(v) for v in args.split(","))
                if width > 0:
                    return cls("ct_window", level=level, width=width)
            elif kind == "mean-std":
                mean_s, std_s = args.split(",")
                mean = tuple(num(v) for v in mean_s.split("/"))
                std = tuple(num(v) for v in std_s.split("/"))
                if all(s > 0 for s in std):
                    return cls("mean_std", mean=mean, std=std)
            elif kind == "scale":
                div = num(args)
                if div != 0:
                    return cls("scale", divisor=div)
            elif kind == "minmax" and not args:
                return cls("minmax")
        except ValueError:
            pass
        raise InputError(f"bad normalisation {spec!r}: use none, ct-window:LEVEL,WIDTH (width > 0), "
                         "mean-std:MEAN,STD (std > 0), scale:DIVISOR (not 0) or minmax, with finite numbers",
                         field="normalize")


# ====================================================================================== sliding window
#: Bounds of a window: each axis, and its voxels (256^3 = 16.8 M: 64 MiB per channel in float32).
ROI_AXIS_MAX = 512
ROI_VOXELS_MAX = 256**3


@dataclass(frozen=True)
class SlidingWindow:
    """How a 3D bundle tiles a volume (MONAI's ``sliding_window_inference``): window ``roi`` (D, H, W),
    ``overlap`` between windows, blending ``mode`` (gaussian or constant), the Gaussian's
    ``sigma_scale`` (of the roi) and windows per call (``batch``). The defaults are MONAI's."""

    roi: tuple[int, ...]
    overlap: float = 0.5
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    batch: int = 1

    def __post_init__(self) -> None:
        roi = self.roi
        if isinstance(roi, (list, tuple)):
            object.__setattr__(self, "roi", tuple(roi))  # a list from JSON or a caller: hashable, comparable
        if not roi or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
            raise InputError(f"roi {list(roi)}: needs positive integers, one per spatial axis")
        shown = "x".join(map(str, roi))
        if max(roi) > ROI_AXIS_MAX:
            raise InputError(f"roi {shown}: each axis at most {ROI_AXIS_MAX} voxels (MONAI's windows are 96-160; "
                             "the window's memory grows with its product)", field="roi")
        if math.prod(roi) > ROI_VOXELS_MAX:
            raise InputError(f"roi {shown}: {math.prod(roi):,} voxels per window, above {ROI_VOXELS_MAX:,} (256^3): a "
                             "U-Net's activations on it would need tens of GB; use a smaller --roi", field="roi")
        if not _number(self.overlap) or not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap {self.overlap!r}: must be a number in [0, 1)")
        if self.mode not in WINDOW_MODES:
            raise InputError(f"sliding-window mode {self.mode!r}: choose {' or '.join(WINDOW_MODES)}")
        if not _number(self.sigma_scale) or self.sigma_scale <= 0:
            raise InputError(f"sigma_scale {self.sigma_scale!r}: must be a positive number")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not 1 <= self.batch <= 4096:
            raise InputError(f"sliding-window batch {self.batch!r}: must be an integer in 1..4096")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlidingWindow:
        # Values pass unconverted: the constructor's checks refuse a string or a bool where a number belongs.
        keys = ("overlap", "mode", "sigma_scale", "batch")
        return cls(roi=tuple(d["roi"]), **{k: d[k] for k in keys if k in d})

    def to_dict(self) -> dict[str, object]:
        return {"roi": list(self.roi), "overlap": self.overlap, "mode": self.mode, "sigma_scale": self.sigma_scale,
                "batch": self.batch}

    def describe(self) -> str:
        return f"window {'x'.join(map(str, self.roi))} (overlap {self.overlap}, {self.mode})"


# ====================================================================================== post-processing
@dataclass(frozen=True)
class Segment:
    """What class ``number`` is called in DICOM outputs: a label, an optional coded type (scheme,
    code, meaning) and an optional display colour (RGB), e.g.
    ``1=Pancreas@SCT:15776009:Pancreas#E6A000``."""

    number: int
    label: str
    type: tuple[str, str, str] | None = None
    color: tuple[int, int, int] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Segment:
        t, c = d.get("type"), d.get("color")
        return cls(int(d["class"]), str(d["label"]), (str(t[0]), str(t[1]), str(t[2])) if t else None,
                   (int(c[0]), int(c[1]), int(c[2])) if c else None)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"class": self.number, "label": self.label}
        if self.type is not None:
            out["type"] = list(self.type)
        if self.color is not None:
            out["color"] = list(self.color)
        return out


#: Display colours of segments that name none (Paul Tol's "bright" set, colour-blind-safe), by class.
SEGMENT_PALETTE = ((238, 102, 119), (34, 136, 51), (68, 119, 170), (204, 187, 68), (102, 204, 238),
                   (170, 51, 119), (187, 187, 187))


def segment_color(number: int, segment: Segment | None = None) -> tuple[int, int, int]:
    """The RGB colour of class ``number``: the segment's own, else the palette's."""
    if segment is not None and segment.color is not None:
        return segment.color
    return SEGMENT_PALETTE[(number - 1) % len(SEGMENT_PALETTE)]


def check_segment_text(entry: Any, top: int, where: str) -> None:
    """One ``postprocessing.segments`` entry (a dict as stored): class in 1..top, a label and an
    optional code that fit their DICOM value representations."""
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), int) or isinstance(entry["class"], bool) \
            or not 1 <= entry["class"] <= top:
        raise InputError(f"{where}: a segment is {{class: 1..{top}, label, type: [scheme, code, meaning]}}")
    texts = {"label": entry.get("label")}
    if "type" in entry:
        t = entry["type"]
        if not isinstance(t, list) or len(t) != 3:
            raise InputError(f"{where}: type must be [scheme, code, meaning]")
        texts.update(zip(("scheme", "code", "meaning"), t))
    for name, text in texts.items():
        if not isinstance(text, str) or not text.strip() or len(text) > SEGMENT_TEXT_MAX[name] \
                or any(ch in text for ch in "\\\r\n\0") or not text.isprintable():
            raise InputError(f"{where}: {name} must be 1..{SEGMENT_TEXT_MAX[name]} printable characters "
                             "(no backslash)")
    color = entry.get("color")
    if color is not None and (not isinstance(color, list) or len(color) != 3
                              or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                         for v in color)):
        raise InputError(f"{where}: color must be RGB, three integers 0..255 (e.g. #E6A000)")


@dataclass(frozen=True)
class Postprocessing:
    """Logits to masks: ``sigmoid_threshold`` (one output channel, sigmoid > ``threshold``) or
    ``argmax`` (several classes); ``segments`` name the foreground classes for DICOM outputs."""

    kind: str = "sigmoid_threshold"
    threshold: float = 0.5
    segments: tuple[Segment, ...] = ()
    #: classes of which only the largest connected component is kept (per image; per volume in 3D)
    keep_largest: tuple[int, ...] = ()
    #: components smaller than this (ml, on the model's grid) are removed (3D bundles with a spacing)
    min_component_ml: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in POST_KINDS:
            raise InputError(f"unknown postprocessing kind {self.kind!r}: {' or '.join(POST_KINDS)}")
        if not _number(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise InputError(f"sigmoid threshold must be in (0, 1), got {self.threshold}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.keep_largest):
            raise InputError(f"keep-largest classes {list(self.keep_largest)}: positive class numbers",
                             field="keep_largest")
        m = self.min_component_ml
        if m is not None and (not _number(m) or not 0 < m < 1e6):
            raise InputError(f"smallest component {m!r} ml: a positive number below 1e6", field="min_component_ml")

    @property
    def cleans_components(self) -> bool:
        return bool(self.keep_largest) or self.min_component_ml is not None

    @classmethod
    def default(cls, out_channels: int) -> Postprocessing:
        return cls("sigmoid_threshold" if out_channels == 1 else "argmax")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Postprocessing:
        keep = d.get("keep_largest", [])
        return cls(d.get("kind", "sigmoid_threshold"), d.get("threshold", 0.5),
                   tuple(Segment.from_dict(s) for s in d.get("segments", [])),
                   tuple(keep) if isinstance(keep, list) else keep, d.get("min_component_ml"))

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind}
        if self.kind == "sigmoid_threshold":
            out["threshold"] = self.threshold
        if self.segments:
            out["segments"] = [s.to_dict() for s in self.segments]
        if self.keep_largest:
            out["keep_largest"] = list(self.keep_largest)
        if self.min_component_ml is not None:
            out["min_component_ml"] = self.min_component_ml
        return out

    def segment(self, number: int) -> Segment | None:
        return next((s for s in self.segments if s.number == number), None)


# ====================================================================================== input and model
@dataclass(frozen=True)
class InputSpec:
    """The graph's input and output: channels in and out, layout (``NCHW`` slices or ``NCDHW``
    volumes) and what each spatial axis is padded up to a multiple of."""

    channels: int
    out_channels: int
    layout: str = "NCHW"
    divisors: tuple[int, ...] = (16, 16)

    @property
    def spatial_dims(self) -> int:
        return len(self.layout) - 2

    @property
    def divisor(self) -> int:
        """The in-plane (W) divisor; 2D bundles use the same one on H."""
        return self.divisors[-1]

    @property
    def classes(self) -> list[int]:
        """The foreground class numbers a mask holds: 1 for one output channel (or two), else 1..K-1."""
        return [1] if self.out_channels <= 2 else list(range(1, self.out_channels))


@dataclass(frozen=True)
class ModelSpec:
    """Everything the Segmenter needs to turn raw images into masks with a bundle's graph."""

    input: InputSpec
    normalization: Normalization = field(default_factory=Normalization)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    sliding_window: SlidingWindow | None = None
    #: voxel spacing (z, y, x) in mm that volumes are resampled to before inference
    spacing: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, object]:
        """A plain-JSON form (Triton's python models read it from their config)."""
        return {"channels": self.input.channels, "out_channels": self.input.out_channels,
                "layout": self.input.layout, "divisors": list(self.input.divisors),
                "normalization": self.normalization.to_dict(), "postprocessing": self.postprocessing.to_dict(),
                "sliding_window": self.sliding_window.to_dict() if self.sliding_window else None,
                "spacing": list(self.spacing) if self.spacing else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        sp = d.get("spacing")
        return cls(InputSpec(int(d["channels"]), int(d["out_channels"]), str(d["layout"]),
                             tuple(int(v) for v in d["divisors"])),
                   Normalization.from_dict(d.get("normalization")), Postprocessing.from_dict(d["postprocessing"]),
                   SlidingWindow.from_dict(d["sliding_window"]) if d.get("sliding_window") else None,
                   (float(sp[0]), float(sp[1]), float(sp[2])) if sp else None)


# ====================================================================================== artifacts, golden
@dataclass(frozen=True)
class Producer:
    """What made an artifact: library versions and the builder's facts (exporter, opset, calibration,
    float layers, ...). ``details`` keeps every recorded key, typed where the readers need one."""

    details: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.details.get(key, default)

    @property
    def calibration_files(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.details.get("calibration_files", []) or [])

    @property
    def weight_bits(self) -> int:
        return int(self.details.get("weight_bits", 8))

    @property
    def float_nodes(self) -> tuple[str, ...]:
        return tuple(str(n) for n in self.details.get("float_nodes", []) or [])

    def made_by(self) -> str:
        """The tools that made the artifact, not every version recorded beside them."""
        d = self.details
        keys = ("nncf", "openvino") if d.get("quantizer") == "nncf" else ("tensorrt",) if "tensorrt" in d and \
            "exporter" not in d else ("torch", "exporter", "opset") if "exporter" in d or "opset" in d else \
            ("torch", "onnxruntime", "tensorrt", "nncf", "openvino")
        return ", ".join(f"{k} {d[k]}" for k in keys if k in d) or "-"


@dataclass(frozen=True)
class ArtifactEntry:
    """One ``artifacts`` entry: kind, size, sha256, precision, producer; engines also their GPU,
    TensorRT version and profiles (in ``extra``)."""

    name: str
    kind: str
    sha256: str
    bytes: int
    precision: str | None = None
    producer: Producer = field(default_factory=Producer)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ArtifactEntry:
        known = ("kind", "sha256", "bytes", "precision", "producer")
        return cls(name, str(d.get("kind", "")), str(d.get("sha256", "")), int(d.get("bytes", 0)), d.get("precision"),
                   Producer(dict(d.get("producer", {}))), {k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class GoldenSource:
    """One held-out file of the golden set."""

    file: str
    sha256: str | None = None
    images: int = 1
    #: held-out image indices of a multi-image file (the rest may calibrate); None: the whole file
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GoldenInfo:
    """Where the golden set came from (``golden`` in the manifest)."""

    kind: str = ""
    reference: str = "torch/fp32"
    root: str | None = None
    sources: tuple[GoldenSource, ...] = ()
    synthetic_cases: int = 0
    labels: bool = False
    calibration_candidates: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GoldenInfo:
        """The record as written by export; a value of the wrong type reads as absent (the record only
        describes the golden set, which golden.npz itself holds)."""
        d = d if isinstance(d, Mapping) else {}
        sources = []
        source = d.get("source")
        for s in source if isinstance(source, list) else []:
            if isinstance(s, Mapping):
                idx = s.get("indices")
                sources.append(GoldenSource(str(s.get("file", "")), _text(s.get("sha256")), _count(s.get("images"), 1),
                                            tuple(i for i in idx if _count(i, -1) >= 0) if isinstance(idx, list)
                                            else None))
        return cls(_text(d.get("kind")) or "", _text(d.get("reference")) or "torch/fp32", _text(d.get("root")),
                   tuple(sources), _count(d.get("synthetic_cases"), 0), d.get("labels") is True,
                   _count(d.get("calibration_candidates"), 0))

    @property
    def recorded(self) -> bool:
        return bool(self.kind)

    @property
    def user_data(self) -> bool:
        return self.kind in ("user-images", "user-volumes")

    def held_out(self) -> dict[str, set[int] | None]:
        """sha256 of each held-out file -> its held-out image indices (None: the whole file)."""
        return {s.sha256: (set(s.indices) if s.indices is not None else None) for s in self.sources if s.sha256}


@dataclass(frozen=True)
class ModelSource:
    """Where the bundle's model came from (``model.source``)."""

    path: str = ""
    layout: str = ""
    demo: bool = False
    parameters: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelSource:
        d = d or {}
        params = d.get("parameters")
        return cls(str(d.get("path", "")), str(d.get("layout", "")), bool(d.get("demo", False)),
                   params if isinstance(params, int) and not isinstance(params, bool) else None)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def spec_of(manifest: Mapping[str, Any]) -> ModelSpec:
    """The model spec of a validated manifest."""
    inp, pre = manifest["input"], manifest["preprocessing"]
    layout = str(inp.get("layout", "NCHW"))
    dims = len(layout) - 2
    value = inp.get("spatial_divisor", 16)
    divisors = tuple(int(v) for v in value) if isinstance(value, list) else (int(value),) * dims
    window = manifest.get("inference", {}).get("sliding_window")
    sp = pre.get("spacing")
    return ModelSpec(InputSpec(int(inp["channels"]), int(manifest["output"]["channels"]), layout, divisors),
                     Normalization.from_dict(pre.get("normalize")),
                     Postprocessing.from_dict(manifest["postprocessing"]),
                     SlidingWindow.from_dict(window) if isinstance(window, Mapping) else None,
                     (float(sp[0]), float(sp[1]), float(sp[2])) if isinstance(sp, list) else None)


def as_tuple(values: Sequence[float]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])
