"""The ``build`` step: one TensorRT engine per precision for this GPU and TensorRT version, reused
from the bundle when its cache key matches, committed together (or nothing is written).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from attunet_deploy.build.tensorrt import (
    BuildPlan,
    BuildSettings,
    EngineInfo,
    Profile,
    build_plan,
    build_with_polygraphy,
    check_engine_fits,
    check_layer_precision,
    check_workspace_mb,
    default_profile,
    default_workspace_mb,
    engine_cache_key,
    engine_name,
    is_polygraphy_exception,
    layer_precisions,
    require_tensorrt,
    volume_profile,
)
from attunet_deploy.bundle import ENGINE_DIR, ArtifactKind, Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.environment import (
    free_device_memory_mb,
    module_version,
)
from attunet_deploy.errors import BackendUnavailable, BuildFailed, InputError
from attunet_deploy.runtimes.base import first_width


@dataclass(frozen=True)
class EngineRecord:
    """One engine of a ``build``: built now, or reused from the bundle (``cached``)."""

    precision: str
    engine: str
    status: str  # "built" or "cached"
    layer_precisions: Mapping[str, int]
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "engine": self.engine, "status": self.status,
                "layer_precisions": dict(self.layer_precisions), "build_seconds": self.build_seconds}


class Built(NamedTuple):
    """What ``build`` committed: the bundle and one record per engine (built or reused from the cache)."""

    bundle: Bundle
    engines: list[EngineRecord]


def build_engines(bundle: Bundle, precisions: list[str], profiles: list[Profile] | None = None,
                  workspace_mb: int | None = None, force: bool = False,
                  reporter: Reporter | None = None) -> Built:
    """Build (or reuse from the cache) one engine per precision for this GPU and TensorRT.

    All engines of one call are committed together at the end; a failed build leaves the
    bundle as it was.
    """
    reporter = reporter or Reporter()
    check_workspace_mb(workspace_mb)
    trt_version, gpu = require_tensorrt()
    profiles = profiles or [bundle_profile(bundle)]
    explicit = workspace_mb is not None
    free_mb = free_device_memory_mb()
    if workspace_mb is None:
        workspace_mb = default_workspace_mb(free_mb)
    plans = [build_plan(p, trt_version) for p in precisions]
    for plan in plans:
        bundle.onnx_path(plan.precision)  # BundleError says to run quantize, before any work
        estimate = check_engine_fits(profiles, first_width(bundle.config), plan.precision,
                                     bundle.artifacts[plan.graph].bytes, workspace_mb, free_mb)
        reporter.info(f"{plan.precision} engine: about {estimate} MB of device memory at the largest profile shape "
                      f"(estimate), {free_mb if free_mb is not None else '?'} MB free")
    results: list[EngineRecord] = []
    engines = {n: e for n, e in bundle.artifacts.items() if e.kind == ArtifactKind.ENGINE}
    with bundle.transaction() as txn:
        for plan in plans:
            precision = plan.precision
            graph_sha = bundle.artifacts[plan.graph].sha256
            settings = BuildSettings(precision, profiles, workspace_mb, plan.strongly_typed, plan.flags,
                                     workspace_explicit=explicit)
            key = engine_cache_key(graph_sha, settings, gpu, trt_version)
            name = engine_name(precision, gpu, trt_version, key)
            stale = [n for n, e in engines.items() if e.precision == precision
                     and e.extra.get("gpu", {}).get("name") == gpu["name"] and e.extra.get("tensorrt") == trt_version
                     and n != name]
            if not force and bundle.has(name) and name in engines and engines[name].extra.get("cache_key") == key:
                results.append(EngineRecord(precision, name, "cached",
                                            dict(engines[name].extra.get("layer_precisions", {}))))
                continue
            for old in stale:
                reporter.info(f"rebuilding {precision}: {old} is stale (graph or build settings changed)")
                txn.remove(old)
            t0 = time.perf_counter()
            with reporter.step(f"Building TensorRT {trt_version} {precision} engine on {gpu['name']} "
                               f"({'strongly typed' if plan.strongly_typed else 'flags ' + ','.join(plan.flags)})"):
                engine_bytes, info = _build_guarded(bundle, txn, plan, settings, trt_version)
            counts = layer_precisions(info)
            problem = check_layer_precision(plan.expect, counts)
            if problem:
                raise BuildFailed(f"{precision} engine not kept: {problem}")
            txn.stage(name).write_bytes(engine_bytes)
            txn.add_artifact(name, kind=ArtifactKind.ENGINE, precision=precision,
                             producer={"tensorrt": trt_version, "polygraphy": module_version("polygraphy") or ""},
                             gpu=gpu, tensorrt=trt_version, cache_key=key, graph=plan.graph, graph_sha256=graph_sha,
                             profiles=[p.to_dict() for p in profiles], settings=settings.canonical(),
                             layer_precisions=dict(counts))
            results.append(EngineRecord(precision, name, "built", dict(counts), time.perf_counter() - t0))
        return Built(txn.commit(), results)


def bundle_profile(bundle: Bundle) -> Profile:
    """The default profile of a bundle: 2D, batches of 64..512 px images; 3D, the sliding window's roi
    (windows per call as the batch) as the optimum, widened to the golden windows so verify runs."""
    if bundle.spatial_dims != 3 or bundle.sliding_window is None:
        return default_profile(bundle.in_channels)
    window = bundle.sliding_window
    divisors = bundle.divisors
    golden = bundle.artifact("golden.npz")
    shapes = golden.extra.get("shapes", []) if golden is not None else []
    cover = [tuple(int(s) for s in (shape[0], shape[1], *(-(-n // d) * d for n, d in zip(shape[2:], divisors))))
             for shape in shapes if len(shape) == 5]
    return volume_profile(bundle.in_channels, window.roi, window.batch, cover)


def _build_guarded(bundle: Bundle, txn: Any, plan: BuildPlan, settings: BuildSettings,
                   trt_version: str) -> tuple[bytes, EngineInfo]:
    """_build_with_polygraphy, with Polygraphy's and TensorRT's failures as one-line BuildFailed."""
    try:
        return _build_with_polygraphy(bundle, txn, plan, settings, trt_version)
    except (BuildFailed, BackendUnavailable, InputError):
        raise
    except Exception as exc:
        # Polygraphy reports a failed build by raising PolygraphyException (G_LOGGER.critical),
        # not by returning None; TensorRT's python bindings raise RuntimeError/TypeError.
        if is_polygraphy_exception(exc) or isinstance(exc, (RuntimeError, TypeError, ValueError)):
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise BuildFailed(f"TensorRT could not build the {plan.precision} engine: {text} (rerun with --debug "
                              "for TensorRT's log)") from exc
        raise


def _build_with_polygraphy(bundle: Bundle, txn: Any, plan: BuildPlan, settings: BuildSettings,
                           trt_version: str) -> tuple[bytes, EngineInfo]:
    """Build one engine from the bundle's graph, with TensorRT's timing cache staged in ``txn``."""
    cache_name = f"{ENGINE_DIR}/timing-trt{trt_version}.cache"
    live_cache = bundle.root / cache_name
    staged_cache = txn.writes.get(cache_name) or txn.stage(cache_name)
    if live_cache.is_file() and not live_cache.is_symlink() and not staged_cache.exists():
        shutil.copyfile(live_cache, staged_cache)  # Polygraphy loads and re-saves the staged copy
    return build_with_polygraphy(bundle.onnx_path(plan.precision), plan, settings, staged_cache)
