"""One timing method for every backend: warm-up, timed iterations, the same statistics.

Default mode times the backend on a ready, padded model-space batch (what trtexec calls
compute + copies). ``end_to_end`` times ``Runner.segment`` on a raw image: normalisation,
padding, inference, cropping and post-processing. GPU runners that expose device timing
(CUDA events) report it beside the host wall-clock time.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle
from .console import Reporter
from .environment import machine_info, versions
from .errors import BackendUnavailable, InputError
from .preprocess import pad_to_divisor
from .runtimes.base import Runner, resolve_auto, runner_class

DEFAULT_ITERATIONS = 30
MAX_DURATION_S = 86_400.0
COV_WARNING = 0.05


@dataclass
class BenchSettings:
    shape: tuple[int, int, int, int]
    warmup: int = 5
    iterations: int | None = None
    duration: float | None = None
    end_to_end: bool = False
    threads: int | None = None
    concurrency: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= 100_000:
            raise InputError("--warmup must be an integer in 0..100000")
        it = self.iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or not 1 <= it <= 10_000_000):
            raise InputError("--iterations must be an integer in 1..10000000")
        d = self.duration
        if d is not None and (not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= MAX_DURATION_S):
            raise InputError(f"--duration must be a number of seconds in (0, {MAX_DURATION_S}]")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 1024):
            raise InputError("--threads must be an integer in 1..1024")
        c = self.concurrency
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 1024:
            raise InputError("--concurrency must be an integer in 1..1024")


def parse_shape(text: str, channels: int | None = None) -> tuple[int, int, int, int]:
    """'1x3x256x256' -> (1, 3, 256, 256); checks four positive ints, the channel count and size limits."""
    from .limits import check_pixels

    parts = text.lower().replace("*", "x").replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise InputError(f"bad shape {text!r}: expected NxCxHxW with positive integers, e.g. 1x3x256x256")
    if channels is not None and dims[1] != channels:
        raise InputError(f"shape {text} has {dims[1]} channels, the model takes {channels}: use "
                         f"{dims[0]}x{channels}x{dims[2]}x{dims[3]}")
    if dims[0] > 4096:
        raise InputError(f"shape {text}: batch {dims[0]} is above 4096")
    check_pixels(dims[2], dims[3], f"shape {text}")
    return dims  # type: ignore[return-value]


def latency_stats(seconds: list[float] | np.ndarray) -> dict[str, float]:
    """Latency statistics in milliseconds. Percentiles use linear interpolation between ranks
    (numpy's default), std is the population standard deviation."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        raise InputError("no timed iterations")
    return {
        "mean": float(ms.mean()),
        "std": float(ms.std()),
        "min": float(ms.min()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


def coefficient_of_variation(stats: dict[str, float]) -> float:
    return stats["std"] / stats["mean"] if stats["mean"] > 0 else math.inf


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024.0 if os.uname().sysname != "Darwin" else peak / (1024.0 * 1024.0)
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / (1024.0 * 1024.0)


def bench_runner(runner: Runner, settings: BenchSettings, reporter: Reporter | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Time one runner; returns the design.md section 8 record."""
    return bench_runners([runner], settings, reporter, seed)[0]


def bench_concurrent(runner: Runner, settings: BenchSettings, padded: np.ndarray,
                     reporter: Reporter | None = None) -> tuple[list[float], float]:
    """``settings.concurrency`` threads sending requests at once (each ``iterations`` requests, or
    for ``duration`` seconds): (per-request seconds, wall seconds). What perf_analyzer measures."""
    import threading

    reporter = reporter or Reporter()
    n = settings.concurrency
    per_worker = settings.iterations or (None if settings.duration else DEFAULT_ITERATIONS)
    times: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = time.perf_counter()

    def worker() -> None:
        done = 0
        try:
            while True:
                if per_worker is not None and done >= per_worker:
                    return
                if per_worker is None and time.perf_counter() - start >= (settings.duration or 0):
                    return
                t0 = time.perf_counter()
                runner.timed_infer(padded)
                with lock:
                    times.append(time.perf_counter() - t0)
                done += 1
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    with reporter.step(f"{n} concurrent clients on {runner.name}"):
        threads = [threading.Thread(target=worker) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return times, time.perf_counter() - start


def bench_runners(runners: list[Runner], settings: BenchSettings, reporter: Reporter | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Time several runners side by side: iterations are interleaved round-robin, so drifting
    load on a shared machine hits every backend alike and their ratios stay fair. With
    ``concurrency`` > 1 each runner is loaded by that many clients at once, one runner after the other."""
    reporter = reporter or Reporter()
    n, c, h, w = settings.shape
    for runner in runners:
        if c != runner.channels:
            raise InputError(f"--shape has {c} channels, the model takes {runner.channels}")
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, c, h, w)).astype(np.float32)
    padded, _ = pad_to_divisor(raw, runners[0].divisor)
    for runner in runners:
        runner.check_memory(padded.shape)

    def once(runner: Runner) -> float | None:
        if settings.end_to_end:
            runner.segment(raw)
            return None
        return runner.timed_infer(padded)

    for runner in runners:
        for _ in range(settings.warmup):
            once(runner)
    if settings.concurrency > 1:
        return [_record(runner, settings, *bench_concurrent(runner, settings, padded, reporter), [])
                for runner in runners]
    host: list[list[float]] = [[] for _ in runners]
    device: list[list[float]] = [[] for _ in runners]
    iterations = settings.iterations or (None if settings.duration else DEFAULT_ITERATIONS)
    names = ", ".join(r.name for r in runners)
    label = f"Timing {names} at {'x'.join(map(str, settings.shape))}"
    budget = (settings.duration or 0.0) * len(runners)
    with reporter.progress(label, iterations or max(1, int(budget))) as advance:
        start = time.perf_counter()
        last_whole = 0
        while True:
            for i, runner in enumerate(runners):
                t0 = time.perf_counter()
                dev = once(runner)
                host[i].append(time.perf_counter() - t0)
                if dev is not None:
                    device[i].append(dev)
            if iterations is not None:
                advance()
                if len(host[0]) >= iterations:
                    break
            else:
                elapsed = time.perf_counter() - start
                if int(elapsed) > last_whole:
                    advance(int(elapsed) - last_whole)
                    last_whole = int(elapsed)
                if elapsed >= budget and len(host[0]) >= 5:
                    break
    for i, runner in enumerate(runners):
        # GPU compute alone (CUDA events around the enqueue), after the host-timed loop so that
        # it never inflates the host latency: what trtexec reports as "GPU Compute Time".
        compute = getattr(runner, "device_compute_times", None)
        if compute is not None and not settings.end_to_end and not device[i]:
            device[i] = compute(padded, len(host[i])) or []
    return [_record(runner, settings, times, None, dev_times, interleaved=len(runners) > 1)
            for runner, times, dev_times in zip(runners, host, device)]


def _record(runner: Runner, settings: BenchSettings, times: list[float], wall: float | None,
            dev_times: list[float], interleaved: bool = False) -> dict[str, Any]:
    """The design.md section 8 record of one runner's timings."""
    n = settings.shape[0]
    rss = peak_rss_mb()
    machine = machine_info()
    stats = latency_stats(times)
    result: dict[str, Any] = {
        "backend": runner.backend,
        "precision": runner.precision,
        "device": runner.device,
        "shape": list(settings.shape),
        "mode": "end-to-end" if settings.end_to_end else "compute",
        "warmup": settings.warmup,
        "iterations": len(times),
        "latency_ms": stats,
        "throughput_ips": (n * len(times) / wall) if wall else n / (stats["mean"] / 1000.0),
        "cov": coefficient_of_variation(stats),
        "peak_rss_mb": rss,
        "threads": settings.threads or os.cpu_count(),
        "concurrency": settings.concurrency,
        "timing": ("host perf_counter, interleaved" if interleaved else "host perf_counter")
        + (f"; {settings.concurrency} concurrent clients, throughput = requests x batch / wall time"
           if wall else ""),
        "versions": versions(),
        "machine": machine,
    }
    if dev_times:
        result["device_latency_ms"] = latency_stats(dev_times)
        result["timing"] += "; device_latency_ms: GPU compute, CUDA events around the enqueue only"
    result.update(runner.bench_extras())
    return result


def bench_many(bundle: Bundle, backends: list[str], precisions: list[str], settings: BenchSettings,
               reporter: Reporter | None = None, **runner_options: Any
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Time every (backend, precision) that can run here, in one process, one after another.

    Returns (results, skipped); each result gets ``ratio_vs_first`` (its p50 over the first's).
    """
    from .bundle import PRECISIONS
    from .runtimes.base import BACKEND_MODULES

    reporter = reporter or Reporter()
    if "all" in backends:
        backends = [b for b in BACKEND_MODULES if b != "triton"]  # a served model needs its URL: ask for it
    if "all" in precisions:
        precisions = list(PRECISIONS)
    threads = settings.threads or os.cpu_count() or 1
    settings.threads = threads
    runners: list[Runner] = []
    skipped: list[dict[str, str]] = []
    try:
        for backend in backends:
            for precision in precisions:
                name = backend
                try:
                    if backend == "auto":
                        name = resolve_auto(bundle, precision)
                    cls = runner_class(name)
                    if precision not in cls.precisions:
                        if len(precisions) > 1:
                            continue  # e.g. torch with --precision all: only fp32 exists, not worth a line
                        raise BackendUnavailable(f"{name} runs {', '.join(cls.precisions)} only")
                    reason = cls.availability(bundle, precision)
                    if reason is not None:
                        raise BackendUnavailable(reason)
                    if name == "torch":
                        import torch

                        torch.set_num_threads(threads)  # same thread count as ONNX Runtime
                    runners.append(cls(bundle, precision, threads=threads, spinning=False,
                                       **runner_options).activate())
                except BackendUnavailable as exc:
                    skipped.append({"backend": name, "precision": precision, "reason": str(exc)})
        results = bench_runners(runners, settings, reporter) if runners else []
    finally:
        for runner in runners:
            runner.deactivate()
    if results:
        first = results[0]["latency_ms"]["p50"]
        for r in results:
            r["ratio_vs_first"] = r["latency_ms"]["p50"] / first if first > 0 else None
    return results, skipped
