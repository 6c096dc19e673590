"""Native TensorRT runner over the bundle's engines (built by ``attdeploy build``).

Execution goes through Polygraphy's ``TrtRunner`` (host<->device copies, shapes, streams).
An execution context is not thread-safe, so each thread gets its own context per profile;
a per-profile lock keeps two contexts from using one optimization profile at once.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..environment import gpu_identity, tensorrt_probe
from ..errors import BackendUnavailable, InputError
from .base import Runner, register


def find_engine(bundle: Bundle, precision: str, gpu: dict[str, Any] | None, trt_version: str
                ) -> tuple[str | None, str]:
    """(engine artifact name, reason) for this GPU and TensorRT; name None when there is none."""
    engines = {n: e for n, e in bundle.artifacts.items()
               if e.get("kind") == "tensorrt-engine" and e.get("precision") == precision}
    if not engines:
        return None, (f"no {precision} engine in the bundle: run 'attdeploy build --precision {precision}' "
                      "on this device")
    for name, entry in engines.items():
        egpu = entry.get("gpu", {})
        if (gpu is not None and egpu.get("name") == gpu.get("name")
                and egpu.get("compute_capability") == gpu.get("compute_capability")
                and entry.get("tensorrt") == trt_version):
            return name, ""
    seen = "; ".join(f"{e.get('gpu', {}).get('name')} sm{e.get('gpu', {}).get('compute_capability')} "
                     f"TensorRT {e.get('tensorrt')}" for e in engines.values())
    here = f"{gpu.get('name')} sm{gpu.get('compute_capability')}" if gpu else "no GPU"
    return None, (f"the {precision} engine(s) were built for {seen}, this is {here} with TensorRT {trt_version}: "
                  f"engines are not portable, run 'attdeploy build --precision {precision}' on this device")


def choose_profile(profiles: list[dict[str, list[int]]], shape: tuple[int, ...]) -> tuple[int, int]:
    """(profile index, max batch per call) for an input shape; InputError if no profile fits H/W.

    A batch above the profile's max N is run in chunks of that size by the caller.
    """
    fits = []
    for i, p in enumerate(profiles):
        if all(lo <= s <= hi for lo, s, hi in zip(p["min"][1:], shape[1:], p["max"][1:])):
            fits.append((i, p))
    if not fits:
        bounds = "; ".join(f"{'x'.join(map(str, p['min']))} .. {'x'.join(map(str, p['max']))}" for p in profiles)
        raise InputError(f"input {'x'.join(map(str, shape))} (padded) fits no engine profile ({bounds}): rebuild "
                         "with 'attdeploy build --min-shape .. --max-shape ..' covering it")
    # Prefer a profile that takes the whole batch, then the narrowest (best-tuned) one.
    fits.sort(key=lambda ip: (ip[1]["max"][0] < shape[0], np.prod(ip[1]["max"][2:])))
    idx, prof = fits[0]
    return idx, int(prof["max"][0])


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
        self._entry = self.bundle.artifacts[name]
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.bundle.require(name).read_bytes())
        if engine is None:
            raise BackendUnavailable(f"TensorRT {probe.version} cannot load {name}: run 'attdeploy build "
                                     f"--precision {self.precision} --force' on this device")
        self._engine = engine
        self._profiles = self._entry["profiles"]
        self._profile_locks = [threading.Lock() for _ in self._profiles]
        self._contexts: list[Any] = []  # every per-thread TrtRunner, to deactivate them all
        self._contexts_lock = threading.Lock()
        self._gpu = self._entry.get("gpu", {}).get("name", "GPU")

    def _context(self, profile: int) -> Any:
        from polygraphy.backend.trt import TrtRunner  # type: ignore[import-not-found]

        per_thread = getattr(self._local, "contexts", None)
        if per_thread is None:
            per_thread = self._local.contexts = {}
        if profile not in per_thread:
            runner = TrtRunner(self._engine, optimization_profile=profile)
            runner.activate()
            per_thread[profile] = runner
            with self._contexts_lock:
                self._contexts.append(runner)
        return per_thread[profile]

    def _deactivate(self) -> None:
        for runner in self._contexts:
            try:
                runner.deactivate()
            except Exception:
                pass
        self._contexts = []
        self._local = threading.local()
        self._engine = None

    @property
    def device(self) -> str:
        return f"cuda:0 ({getattr(self, '_gpu', 'GPU')})"

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, float | None]:
        idx, max_batch = choose_profile(self._profiles, x.shape)
        outs = []
        gpu_ms = 0.0
        timed = True
        with self._profile_locks[idx]:
            ctx = self._context(idx)
            for start in range(0, x.shape[0], max_batch):
                chunk = np.ascontiguousarray(x[start:start + max_batch])
                t = _cuda_event_timer(ctx)
                result = ctx.infer({"image": chunk})
                elapsed = t() if t else None
                if elapsed is None:
                    timed = False
                else:
                    gpu_ms += elapsed
                outs.append(np.asarray(result["logits"], dtype=np.float32))
        return np.concatenate(outs, axis=0), (gpu_ms / 1000.0 if timed else None)

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0]

    def timed_infer(self, padded: np.ndarray) -> float | None:
        if not self.is_active:
            self.activate()
        return self._run(padded)[1]

    def bench_extras(self) -> dict[str, Any]:
        from ..environment import free_device_memory_mb

        return {"engine_device_memory_mb": int(getattr(self._engine, "device_memory_size", 0)) >> 20,
                "free_device_memory_mb": free_device_memory_mb(), "cuda_graphs": False,
                "tensorrt": self._entry.get("tensorrt")}


def _cuda_event_timer(trt_runner: Any) -> Any:
    """Record a CUDA event on the runner's stream; the returned callable gives elapsed ms after
    the next synchronisation. None when cuda-python or the stream handle is not available."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]

        stream = trt_runner.stream.ptr
        _, start = cudart.cudaEventCreate()
        _, end = cudart.cudaEventCreate()
        cudart.cudaEventRecord(start, stream)
    except Exception:
        return None

    def stop() -> float | None:
        try:
            cudart.cudaEventRecord(end, stream)
            cudart.cudaEventSynchronize(end)
            err, ms = cudart.cudaEventElapsedTime(start, end)
            return float(ms) if int(err) == 0 else None
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)

    return stop
