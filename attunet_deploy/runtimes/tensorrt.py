"""Native TensorRT runner over the bundle's engines (built by ``attdeploy build``).

Execution goes through Polygraphy's ``TrtRunner`` (host<->device copies, shapes, streams).

Contexts: **one execution context per optimization profile, shared by all threads under that
profile's lock.** A context is not thread-safe, and two contexts must not use one profile at
once, so per-thread contexts would serialise on the same lock anyway while each holding its
own activation memory (threads x profiles copies; out of memory on an 8 GB Jetson). On
TensorRT >= 10 each context allocates only what its own profile needs (Polygraphy's
"profile" allocation strategy) instead of the maximum over all profiles.

Outputs are copied out of Polygraphy's host buffers, which it reuses on the next call.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from attunet_deploy.bundle import ONNX_FILES, ArtifactKind, Bundle
from attunet_deploy.environment import gpu_identity, tensorrt_major, tensorrt_probe
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import register


def find_engine(bundle: Bundle, precision: str, gpu: Mapping[str, object] | None, trt_version: str
                ) -> tuple[str | None, str]:
    """(engine artifact name, reason) for this GPU and TensorRT; name None when there is none.

    An engine built from an older version of the graph (re-quantised since) is stale.
    """
    engines = {n: e.extra for n, e in bundle.artifacts.items()
               if e.kind == ArtifactKind.ENGINE and e.precision == precision}
    if not engines:
        return None, (f"no {precision} engine in the bundle: run 'attdeploy build --precision {precision}' "
                      "on this device")
    graph = bundle.sha256(ONNX_FILES[precision])
    stale = False
    for name, entry in engines.items():
        egpu = entry.get("gpu", {})
        if (gpu is not None and egpu.get("name") == gpu.get("name")
                and egpu.get("compute_capability") == gpu.get("compute_capability")
                and entry.get("tensorrt") == trt_version):
            if graph is not None and entry.get("graph_sha256") not in (None, graph):
                stale = True
                continue
            return name, ""
    if stale:
        return None, (f"the {precision} engine was built from an older {ONNX_FILES[precision]}: run 'attdeploy "
                      f"build --precision {precision}' again")
    seen = "; ".join(f"{e.get('gpu', {}).get('name')} sm{e.get('gpu', {}).get('compute_capability')} "
                     f"TensorRT {e.get('tensorrt')}" for e in engines.values())
    here = f"{gpu.get('name')} sm{gpu.get('compute_capability')}" if gpu else "no GPU"
    return None, (f"the {precision} engine(s) were built for {seen}, this is {here} with TensorRT {trt_version}: "
                  f"engines are not portable, run 'attdeploy build --precision {precision}' on this device")


def choose_profile(profiles: list[dict[str, list[int]]], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(profile index, min batch, max batch per call) for an input shape; InputError if no profile
    fits its C/H/W.

    A profile whose batch range holds the whole batch is preferred, then the narrowest
    (best-tuned) one. The caller runs a batch above the max in chunks and pads a batch (or
    last chunk) below the min up to it: TensorRT refuses shapes outside the profile.
    """
    fits = []
    for i, p in enumerate(profiles):
        if all(lo <= s <= hi for lo, s, hi in zip(p["min"][1:], shape[1:], p["max"][1:])):
            fits.append((i, p))
    if not fits:
        bounds = "; ".join(f"{'x'.join(map(str, p['min']))} .. {'x'.join(map(str, p['max']))}" for p in profiles)
        raise InputError(f"input {'x'.join(map(str, shape))} (padded) fits no engine profile ({bounds}): rebuild "
                         "with 'attdeploy build --min-shape .. --max-shape ..' covering it")
    n = shape[0]
    fits.sort(key=lambda ip: (not ip[1]["min"][0] <= n <= ip[1]["max"][0], ip[1]["min"][0] > n,
                              int(np.prod(ip[1]["max"][2:]))))
    idx, prof = fits[0]
    return idx, int(prof["min"][0]), int(prof["max"][0])


def plan_chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, pad) per call: chunks of at most ``max_batch`` images, each padded with copies
    of its last image up to ``min_batch`` where it is smaller."""
    if min_batch < 1 or max_batch < min_batch:
        raise InputError(f"engine profile has an unusable batch range {min_batch}..{max_batch}")
    out = []
    for start in range(0, n, max_batch):
        stop = min(n, start + max_batch)
        out.append((start, stop, max(0, min_batch - (stop - start))))
    return out


def run_chunks(infer: Any, x: np.ndarray, min_batch: int, max_batch: int) -> np.ndarray:
    """Run ``infer`` ({'image': chunk} -> {'logits': array}) over ``x`` in profile-sized chunks.

    Each chunk's logits are *copied*: Polygraphy's TrtRunner returns views of host buffers that
    it reuses (and may resize) on the next call.
    """
    outs = []
    for start, stop, pad in plan_chunks(x.shape[0], min_batch, max_batch):
        chunk = x[start:stop]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        result = infer({"image": np.ascontiguousarray(chunk)})
        logits = np.array(result["logits"], dtype=np.float32, copy=True)
        outs.append(logits[: stop - start])
    return np.concatenate(outs, axis=0)


def engine_device_memory_mb(engine: Any) -> int | None:
    """Activation memory the engine needs, in MB; None when this TensorRT does not say.

    TensorRT 11 removed ``device_memory_size`` (``device_memory_size_v2`` since 10.1).
    """
    for attr in ("device_memory_size_v2", "device_memory_size"):
        value = getattr(engine, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value >> 20
    return None


def allocation_strategy(trt_version: str) -> str | None:
    """Polygraphy allocation strategy per context: 'profile' where TensorRT has user-managed
    context memory (10.0+), else Polygraphy's default static allocation."""
    return "profile" if tensorrt_major(trt_version) >= 10 else None


@register
class TensorrtRunner(Runner):
    backend = "trt"

    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        probe = tensorrt_probe()
        if not probe.available:
            return probe.detail
        name, reason = find_engine(bundle, precision, gpu_identity(), probe.version)
        return None if name else reason

    def _activate(self) -> None:
        import tensorrt as trt  # type: ignore[import-not-found]

        probe = tensorrt_probe()
        if not probe.available:
            raise BackendUnavailable(probe.detail)
        name, reason = find_engine(self.bundle, self.precision, gpu_identity(), probe.version)
        if name is None:
            raise BackendUnavailable(reason)
        entry = self.bundle.artifact(name)
        assert entry is not None  # find_engine named a listed engine
        self._entry = entry.extra
        self._trt_version = probe.version
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine_name = name
        engine = self._runtime.deserialize_cuda_engine(self.bundle.read_artifact(name))
        if engine is None:
            raise BackendUnavailable(f"TensorRT {probe.version} cannot load {name}: run 'attdeploy build "
                                     f"--precision {self.precision} --force' on this device")
        self._engine = engine
        self._profiles = self._entry["profiles"]
        self._profile_locks = [threading.Lock() for _ in self._profiles]
        self._contexts: dict[int, Any] = {}
        self._contexts_lock = threading.Lock()
        self._gpu = self._entry.get("gpu", {}).get("name", "GPU")

    def _context(self, profile: int) -> Any:
        """The one TrtRunner (execution context) of ``profile``; call with its lock held."""
        ctx = self._contexts.get(profile)
        if ctx is None:
            from polygraphy.backend.trt import TrtRunner  # type: ignore[import-not-found]

            kwargs: dict[str, object] = {"optimization_profile": profile}
            strategy = allocation_strategy(self._trt_version)
            if strategy is not None:
                kwargs["allocation_strategy"] = strategy
            ctx = TrtRunner(self._engine, **kwargs)
            _polygraphy_call(ctx.activate)
            with self._contexts_lock:
                self._contexts[profile] = ctx
        return ctx

    def suspects(self) -> str:
        name = getattr(self, "_engine_name", None)
        return (f"rebuild {self.bundle.path(name)} with 'attdeploy build' (TensorRT or the GPU driver changed, or "
                "the engine does not fit this GPU)" if name else "rebuild the engine with 'attdeploy build'")

    def _deactivate(self) -> None:
        for ctx in self._contexts.values():
            try:
                ctx.deactivate()
            except Exception:
                pass
        self._contexts = {}
        self._engine = None

    @property
    def device(self) -> str:
        return f"cuda:0 ({getattr(self, '_gpu', 'GPU')})"

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        idx, min_batch, max_batch = choose_profile(self._profiles, x.shape)
        with self._profile_locks[idx]:
            ctx = self._context(idx)
            return run_chunks(lambda feed: _polygraphy_call(ctx.infer, feed), x, min_batch, max_batch)

    def device_compute_times(self, padded: np.ndarray, iterations: int) -> list[float] | None:
        """GPU compute seconds per enqueue, CUDA events recorded on the context's stream right
        around ``execute_async_v3`` (trtexec's "GPU Compute Time"): no copies, no Python.

        None when the batch needs more than one call or cuda-python is missing.
        """
        if not self.is_active:
            self.activate()
        idx, min_batch, max_batch = choose_profile(self._profiles, padded.shape)
        if not min_batch <= padded.shape[0] <= max_batch:
            return None
        with self._profile_locks[idx]:
            ctx = self._context(idx)
            _polygraphy_call(ctx.infer, {"image": np.ascontiguousarray(padded)})  # shapes + addresses set
            return enqueue_times(ctx, iterations)

    def bench_extras(self) -> dict[str, object]:
        from attunet_deploy.environment import free_device_memory_mb

        return {"engine_device_memory_mb": engine_device_memory_mb(self._engine),
                "free_device_memory_mb": free_device_memory_mb(), "cuda_graphs": False,
                "tensorrt": self._entry.get("tensorrt"),
                "contexts": "one per optimization profile, shared under a lock"}


def _polygraphy_call(fn: Any, *args: Any) -> Any:
    """Polygraphy reports failures by raising PolygraphyException: make them one-line errors."""
    try:
        return fn(*args)
    except Exception as exc:
        if type(exc).__name__ == "PolygraphyException":
            raise InputError(f"TensorRT refused the call: {' '.join(str(exc).split())[:300]}") from exc
        raise


def enqueue_times(trt_runner: Any, iterations: int, cudart: Any = None) -> list[float] | None:
    """Seconds per ``execute_async_v3`` on the runner's stream, bracketed by CUDA events.

    The input is already on the device and its shape and address set by a previous ``infer``,
    so only the enqueued GPU work is timed.
    """
    if cudart is None:
        try:
            from cuda.bindings import runtime as cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    stream = trt_runner.stream.ptr
    context = trt_runner.context
    err, start = cudart.cudaEventCreate()
    err2, end = cudart.cudaEventCreate()
    if int(err) != 0 or int(err2) != 0:
        return None
    times = []
    try:
        for _ in range(iterations):
            cudart.cudaEventRecord(start, stream)
            if not context.execute_async_v3(stream):
                raise InputError("TensorRT execute_async_v3 failed while timing")
            cudart.cudaEventRecord(end, stream)
            cudart.cudaEventSynchronize(end)
            err, ms = cudart.cudaEventElapsedTime(start, end)
            if int(err) != 0:
                return None
            times.append(float(ms) / 1000.0)
    finally:
        cudart.cudaEventDestroy(start)
        cudart.cudaEventDestroy(end)
    return times
