"""ONNX -> TensorRT engine, built on the device that will run it.

Our code decides *what* to build (graph per precision, strongly typed or builder flags per
TensorRT major, optimization profiles, workspace, cache key) and checks the result (layer
precisions); Polygraphy's version-aware loaders make the TensorRT calls.

Precision comes from the graph (docs/design.md section 4): ``model.fp16.onnx`` and the Q/DQ
``model.int8.onnx``. TensorRT >= 10 builds them strongly typed (TensorRT 11 has no FP16/INT8
flags); TensorRT 8.6 (JetPack 6.0) builds the same graphs weakly typed with the flags set.
Engines are keyed by sha256 of the graph + build settings + GPU + TensorRT version.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attunet_deploy.bundle import ENGINE_DIR, ONNX_FILES
from attunet_deploy.environment import (
    GpuIdentity,
    gpu_identity,
    tensorrt_major,
    tensorrt_probe,
)
from attunet_deploy.errors import BackendUnavailable, BuildFailed, InputError

Shape = tuple[int, ...]
#: Default profile: covers the golden set (batch <= 8, 64..512 px) with an optimum at 256.
DEFAULT_PROFILE_HW = (64, 256, 512)
DEFAULT_MAX_BATCH = 8
WORKSPACE_FRACTION = 0.25  # of free device memory: Jetson boards share it with the CPU
WORKSPACE_BOUNDS_MB = (256, 4096)
WORKSPACE_UNKNOWN_MB = 1024


@dataclass(frozen=True)
class Profile:
    """One optimization profile for the input ``image`` (NCHW, or NCDHW for 3D bundles)."""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Shape) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def describe(self) -> str:
        fmt = "x".join
        return f"{fmt(map(str, self.min))} .. {fmt(map(str, self.max))} (opt {fmt(map(str, self.opt))})"

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, list[int]]) -> Profile:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))  # type: ignore[arg-type]


def default_profile(channels: int) -> Profile:
    lo, opt, hi = DEFAULT_PROFILE_HW
    return Profile((1, channels, lo, lo), (1, channels, opt, opt), (DEFAULT_MAX_BATCH, channels, hi, hi))


def volume_profile(channels: int, roi: tuple[int, ...], batch: int, cover: Sequence[tuple[int, ...]] = ()
                   ) -> Profile:
    """A 3D bundle's default profile: the sliding window's roi (``batch`` windows per call) as the
    optimum, widened to ``cover`` (padded shapes that must also run, e.g. the golden windows)."""
    shapes = [(batch, channels, *roi), *cover]
    lo = tuple(min(s[i] for s in shapes) for i in range(len(shapes[0])))
    hi = tuple(max(s[i] for s in shapes) for i in range(len(shapes[0])))
    return Profile((1, *lo[1:]), (batch, channels, *roi), hi)


def parse_profiles(mins: tuple[str, ...] | list[str], opts: tuple[str, ...] | list[str],
                   maxs: tuple[str, ...] | list[str], channels: int, divisor: int | tuple[int, ...] = 16,
                   spatial_dims: int = 2, default: Profile | None = None) -> list[Profile]:
    """Profiles from repeated --min/--opt/--max-shape options (the k-th of each form profile k),
    NxCxHxW for 2D bundles and NxCxDxHxW for 3D ones.

    No options: ``default`` (or the 2D default profile). A missing --opt-shape defaults to the --max-shape.
    """
    from attunet_deploy.preprocess import parse_shape

    if not mins and not opts and not maxs:
        return [default or default_profile(channels)]
    if len(mins) != len(maxs) or (opts and len(opts) != len(mins)):
        raise InputError(f"profiles need as many --min-shape as --max-shape (and --opt-shape, if given): "
                         f"got {len(mins)} min, {len(opts)} opt, {len(maxs)} max")
    divisors = (divisor,) * spatial_dims if isinstance(divisor, int) else tuple(divisor)
    axes = "DHW"[-spatial_dims:]
    profiles = []
    for i, (lo_s, hi_s) in enumerate(zip(mins, maxs)):
        lo, hi = parse_shape(lo_s, channels, spatial_dims), parse_shape(hi_s, channels, spatial_dims)
        opt = parse_shape(opts[i], channels, spatial_dims) if opts else hi
        for name, shp in (("min", lo), ("opt", opt), ("max", hi)):
            if any(n % d for n, d in zip(shp[2:], divisors)):
                raise InputError(f"profile {i + 1} {name} shape {'x'.join(map(str, shp))}: {', '.join(axes)} must be "
                                 f"multiples of {'x'.join(map(str, divisors))} (runners pad inputs up to them)")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise InputError(f"profile {i + 1}: need min <= opt <= max in every dimension, got "
                             f"{'x'.join(map(str, lo))} / {'x'.join(map(str, opt))} / {'x'.join(map(str, hi))}")
        profiles.append(Profile(lo, opt, hi))
    return profiles


#: Bytes per activation element in an engine of each precision (int8 engines keep some layers in
#: float, and TensorRT reformats between them).
_ACTIVATION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.5}


def estimate_engine_mb(shape: Shape, base_channels: int, precision: str, weight_bytes: int) -> int:
    """Device memory an engine needs at profile shape ``shape`` beyond the workspace, in MB: the
    activations of an Attention U-Net forward pass (about 8 full-resolution tensors of
    ``base_channels`` live at the peak, deeper levels a third more) plus the weights.

    An upper-side estimate: TensorRT reuses activation memory between layers, so engines measure
    below it; its purpose is to refuse a build that cannot fit before a Jetson spends minutes on it.
    """
    voxels = 1
    for d in shape[2:]:
        voxels *= int(d)
    act = shape[0] * voxels * base_channels * 8 * 4 / 3 * _ACTIVATION_BYTES.get(precision, 4.0)
    weights = weight_bytes * (_ACTIVATION_BYTES.get(precision, 4.0) / 4.0)
    return int((act + weights) / (1 << 20)) + 1


def check_engine_fits(profiles: list[Profile], base_channels: int, precision: str, weight_bytes: int,
                      workspace_mb: int, free_mb: int | None) -> int:
    """The estimate (MB) for the largest profile; BuildFailed with it when it cannot fit in ``free_mb``."""
    largest = max(profiles, key=lambda p: _volume(p.max))
    need = estimate_engine_mb(largest.max, base_channels, precision, weight_bytes)
    if free_mb is not None and need + workspace_mb > free_mb:
        raise BuildFailed(f"the {precision} engine needs about {need} MB of device memory at its largest profile "
                          f"shape {'x'.join(map(str, largest.max))} plus a {workspace_mb} MB build workspace; this "
                          f"device has {free_mb} MB free: lower --max-shape (a smaller roi or fewer windows per call), "
                          "build fp16/int8, or free device memory")
    return need


def _volume(shape: Shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


@dataclass(frozen=True)
class BuildPlan:
    """How to build one precision with a given TensorRT: which graph, typing, builder flags."""

    precision: str
    graph: str
    strongly_typed: bool
    flags: tuple[str, ...] = ()
    expect: str = "fp32"  # layer precision that must appear in the built engine


def build_plan(precision: str, trt_version: str) -> BuildPlan:
    """Graph and settings per TensorRT major: strongly typed on >= 10, flags on 8.x/9.x."""
    if precision not in ONNX_FILES:
        raise InputError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    major = tensorrt_major(trt_version)
    if major < 8:
        raise BackendUnavailable(f"TensorRT {trt_version} is too old: need 8.6 or newer")
    graph = ONNX_FILES[precision]
    if major >= 10:
        return BuildPlan(precision, graph, strongly_typed=True, flags=(), expect=precision)
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}[precision]
    return BuildPlan(precision, graph, strongly_typed=False, flags=flags, expect=precision)


def check_workspace_mb(workspace_mb: int | None) -> None:
    if workspace_mb is not None and (isinstance(workspace_mb, bool) or not 1 <= workspace_mb <= 1 << 20):
        raise InputError("--workspace-mb must be an integer in 1..1048576")


def default_workspace_mb(free_mb: int | None) -> int:
    """A quarter of free device memory, within 256 MB..4 GB; 1 GB when unknown."""
    if free_mb is None or free_mb <= 0:
        return WORKSPACE_UNKNOWN_MB
    lo, hi = WORKSPACE_BOUNDS_MB
    return int(min(hi, max(lo, free_mb * WORKSPACE_FRACTION)))


@dataclass
class BuildSettings:
    """Everything that changes the engine besides the graph, GPU and TensorRT version."""

    precision: str
    profiles: list[Profile]
    workspace_mb: int
    strongly_typed: bool
    flags: tuple[str, ...] = ()
    builder_optimization_level: int = 3
    extra: dict[str, object] = field(default_factory=dict)
    #: False when workspace_mb is our default (a share of *current* free memory): it then stays
    #: out of the cache key, or the key would drift with free memory and engines be rebuilt.
    workspace_explicit: bool = True

    def canonical(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        d["flags"] = list(self.flags)
        return d

    def key_fields(self) -> dict[str, Any]:
        d = self.canonical()
        if not self.workspace_explicit:
            d["workspace_mb"] = "default"
        d.pop("workspace_explicit")
        return d


def engine_cache_key(graph_sha256: str, settings: BuildSettings, gpu: Mapping[str, object], trt_version: str) -> str:
    """sha256 over graph hash, build settings, GPU name + compute capability, TensorRT version."""
    payload = {"graph": graph_sha256, "settings": settings.key_fields(),
               "gpu": {"name": gpu.get("name"), "compute_capability": gpu.get("compute_capability")},
               "tensorrt": trt_version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_name(precision: str, gpu: Mapping[str, object], trt_version: str, key: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(gpu.get("name", "gpu")).lower()).strip("-")
    cc = str(gpu.get("compute_capability", "")).replace(".", "")
    return f"{ENGINE_DIR}/{precision}-{slug}-sm{cc}-trt{trt_version}-{key[:12]}.engine"


# ------------------------------------------------------------------------------------ layer check
#: An engine as Polygraphy's inspector describes it (JSON: its layers, their inputs' formats).
EngineInfo = dict[str, Any]
_SKIP_LAYER_TYPES = ("reformat", "shuffle", "nocopy")


def tensor_datatype(tensor: Any) -> str:
    """'int8' | 'fp16' | 'fp32' | 'other' | '' for one tensor of the inspector JSON.

    TensorRT 10 writes one combined ``"Format/Datatype"`` string ("Int8 NC32HW32", "Half",
    "Row major linear FP32"); TensorRT 11 splits it into ``"Datatype"`` and ``"Format"``.
    """
    if not isinstance(tensor, dict):
        return ""
    raw = tensor.get("Datatype")
    if not isinstance(raw, str) or not raw:
        raw = tensor.get("Format/Datatype")
    if not isinstance(raw, str) or not raw or "n/a" in raw.lower():
        return ""
    text = raw.lower()
    if "int8" in text:
        return "int8"
    if "half" in text or "fp16" in text:
        return "fp16"
    if "float" in text or "fp32" in text:
        return "fp32"
    return "other"


def _is_convolution(layer: dict[str, Any]) -> bool:
    kind = str(layer.get("LayerType", "")).lower()
    return "conv" in kind or "gemm" in kind


def layer_precisions(engine_info: EngineInfo) -> Counter[str]:
    """Count engine layers by precision, from the engine inspector's JSON (DETAILED verbosity).

    A layer's precision is that of its first *input* (as NVIDIA's engine explorer trex reads
    it): a convolution with int8 inputs and a float output runs int8; a leftover Quantize layer
    (float input) does not. ``int8_conv`` counts convolutions whose first input is int8, the
    evidence that an INT8 engine really computes in int8. Reformat/copy layers are not counted.
    """
    counts: Counter[str] = Counter()
    layers = engine_info.get("Layers", []) if isinstance(engine_info, dict) else []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict):
            continue
        if str(layer.get("LayerType", "")).lower() in _SKIP_LAYER_TYPES:
            continue
        inputs = layer.get("Inputs") if isinstance(layer.get("Inputs"), list) else []
        outputs = layer.get("Outputs") if isinstance(layer.get("Outputs"), list) else []
        dtype = tensor_datatype(inputs[0]) if inputs else ""
        if not dtype and outputs:
            dtype = tensor_datatype(outputs[0])
        if not dtype:
            continue
        counts[dtype] += 1
        if dtype == "int8" and _is_convolution(layer):
            counts["int8_conv"] += 1
    return counts


def check_layer_precision(requested: str, counts: Counter[str]) -> str | None:
    """None if the engine really runs ``requested`` somewhere, else why not.

    FP16/INT8 engines keep some float layers (casts, the float gates/head): we require that
    the requested precision is present, not exclusive; for INT8, in convolutions.
    """
    if not counts:
        return "the engine reports no layer information (build with detailed profiling verbosity)"
    if requested == "fp32":
        return None
    found = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    if requested == "int8" and counts.get("int8_conv", 0) == 0:
        return (f"no convolution runs in int8 (layers by input precision: {found}); on TensorRT 11 precision must "
                "come from the graph: rerun 'attdeploy quantize'")
    if counts.get(requested, 0) == 0:
        return (f"no {requested} layers in the engine (layers: {found}); on TensorRT 11 precision must come "
                f"from the graph: rerun 'attdeploy quantize'")
    return None


# ------------------------------------------------------------------------------------ building
def require_tensorrt() -> tuple[str, GpuIdentity]:
    """(TensorRT version, GPU identity) or BackendUnavailable naming what is missing."""
    probe = tensorrt_probe()
    if not probe.available:
        raise BackendUnavailable(f"cannot build TensorRT engines here: {probe.detail}")
    gpu = gpu_identity()
    if gpu is None:
        raise BackendUnavailable("cannot build TensorRT engines here: no CUDA GPU found")
    return probe.version, gpu


def is_polygraphy_exception(exc: BaseException) -> bool:
    try:
        from polygraphy.exception import PolygraphyException  # type: ignore[import-not-found]
    except ImportError:
        return type(exc).__name__ == "PolygraphyException"
    return isinstance(exc, PolygraphyException)


def build_with_polygraphy(graph_path: Path, plan: BuildPlan, settings: BuildSettings,
                          timing_cache: Path) -> tuple[bytes, EngineInfo]:
    """Build with Polygraphy's loaders; return the serialized engine and its inspector JSON.

    ``timing_cache`` is loaded when it exists and saved after the build."""
    import tensorrt as trt  # type: ignore[import-not-found]
    from polygraphy.backend.trt import (  # type: ignore[import-not-found]
        CreateConfig,
        NetworkFromOnnxPath,
        engine_bytes_from_network,
    )
    from polygraphy.backend.trt import Profile as PolyProfile

    network = NetworkFromOnnxPath(str(graph_path), strongly_typed=plan.strongly_typed or None)
    poly_profiles = [PolyProfile().add("image", min=p.min, opt=p.opt, max=p.max) for p in settings.profiles]
    # None, not False, for flags we do not set: TensorRT 11 has no FP16/INT8 flags to touch at all.
    config = CreateConfig(
        fp16=True if "FP16" in plan.flags else None, int8=True if "INT8" in plan.flags else None,
        profiles=poly_profiles,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: settings.workspace_mb << 20},
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        builder_optimization_level=settings.builder_optimization_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
    )
    engine_bytes = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    if engine_bytes is None:
        raise BuildFailed(f"TensorRT could not build the {plan.precision} engine (see its log above)")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(bytes(engine_bytes))
    if engine is None:
        raise BuildFailed("TensorRT built an engine it cannot deserialize")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return bytes(engine_bytes), info
