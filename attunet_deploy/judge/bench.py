"""One timing method for every backend: warm-up, timed iterations, the same statistics.

Default mode times the backend on a ready, padded model-space batch (what trtexec calls
compute + copies). ``end_to_end`` times ``Runner.segment`` on a raw image: normalisation,
padding, inference, cropping and post-processing. GPU runners that expose device timing
(CUDA events) report it beside the host wall-clock time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.bundle.spec import SlidingWindow
from attunet_deploy.console import Reporter
from attunet_deploy.environment import machine_info, versions
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.judge.results import BenchResult, Skip
from attunet_deploy.runtimes import registry
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.select import open_runner, resolve_auto

DEFAULT_ITERATIONS = 30
#: A whole volume takes seconds: fewer timed runs by default.
VOLUME_ITERATIONS = 3
MAX_DURATION_S = 86_400.0
COV_WARNING = 0.05


@dataclass
class BenchSettings:
    shape: tuple[int, ...]
    warmup: int = 5
    iterations: int | None = None
    duration: float | None = None
    end_to_end: bool = False
    threads: int | None = None
    concurrency: int = 1
    #: ``shape`` is a whole volume, run through the bundle's sliding window (3D bundles)
    volume: bool = False

    def __post_init__(self) -> None:
        self.check_options(warmup=self.warmup, iterations=self.iterations, duration=self.duration,
                           threads=self.threads, concurrency=self.concurrency)

    @classmethod
    def check_options(cls, *, warmup: int = 5, iterations: int | None = None, duration: float | None = None,
                      threads: int | None = None, concurrency: int = 1) -> None:
        """InputError naming the first option out of range (the CLI checks before any work)."""
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= 100_000:
            raise InputError("--warmup must be an integer in 0..100000")
        it = iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or not 1 <= it <= 10_000_000):
            raise InputError("--iterations must be an integer in 1..10000000")
        d = duration
        if d is not None and (not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= MAX_DURATION_S):
            raise InputError(f"--duration must be a number of seconds in (0, {MAX_DURATION_S}]")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= 1024):
            raise InputError("--threads must be an integer in 1..1024")
        c = concurrency
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 1024:
            raise InputError("--concurrency must be an integer in 1..1024")


def default_shape(bundle: Bundle) -> tuple[int, ...]:
    """What ``bench`` times without --shape: one 256x256 image, or one sliding window of a 3D bundle."""
    window = bundle.sliding_window
    if window is not None:
        return (1, bundle.in_channels, *window.roi)
    return (1, bundle.in_channels, 256, 256)


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
                 seed: int = 0) -> BenchResult:
    """Time one runner; returns the docs/design.md section 8 record."""
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
                  seed: int = 0) -> list[BenchResult]:
    """Time several runners side by side: iterations are interleaved round-robin, so drifting
    load on a shared machine hits every backend alike and their ratios stay fair. With
    ``concurrency`` > 1 each runner is loaded by that many clients at once, one runner after the other."""
    reporter = reporter or Reporter()
    c = settings.shape[1]
    for runner in runners:
        if c != runner.channels:
            raise InputError(f"--shape has {c} channels, the model takes {runner.channels}")
        if len(settings.shape) != runner.spatial_dims + 2:
            raise InputError(f"--shape {'x'.join(map(str, settings.shape))}: the model takes "
                             f"N x C x {' x '.join('DHW'[-runner.spatial_dims:])}")
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal(settings.shape).astype(np.float32)
    padded, _ = runners[0].segmenter.pad(raw)
    for runner in runners:
        if settings.volume:
            if runner.bundle.sliding_window is None:
                raise InputError("--volume needs a 3D bundle (its sliding window); time 2D images with --shape")
        else:  # a volume goes through windows, so its memory is one window's
            runner.check_memory(padded.shape)

    def once(runner: Runner) -> float | None:
        if settings.volume:
            runner.infer_volume(raw)
            return None
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
    iterations = settings.iterations or (None if settings.duration else (VOLUME_ITERATIONS if settings.volume
                                                                          else DEFAULT_ITERATIONS))
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
        if not settings.end_to_end and not device[i]:
            device[i] = runner.device_compute_times(padded, len(host[i])) or []
    return [_record(runner, settings, times, None, dev_times, interleaved=len(runners) > 1)
            for runner, times, dev_times in zip(runners, host, device)]


def _record(runner: Runner, settings: BenchSettings, times: list[float], wall: float | None,
            dev_times: list[float], interleaved: bool = False) -> BenchResult:
    """The docs/design.md section 8 record of one runner's timings."""
    n = settings.shape[0]
    rss = peak_rss_mb()
    machine = machine_info()
    stats = latency_stats(times)
    timing = ("host perf_counter, interleaved" if interleaved else "host perf_counter") \
        + (f"; {settings.concurrency} concurrent clients, throughput = requests x batch / wall time" if wall else "")
    if dev_times:
        timing += "; device_latency_ms: GPU compute, CUDA events around the enqueue only"
    extras = dict(runner.bench_extras())
    window = runner.bundle.sliding_window
    if settings.volume and window is not None:
        windows = volume_windows(settings.shape[2:], window)
        p50_s = stats["p50"] / 1000.0
        extras.update(volume_seconds=p50_s, windows=windows * n,
                      windows_per_s=windows * n / p50_s if p50_s > 0 else None)
    mode = "volume" if settings.volume else "end-to-end" if settings.end_to_end else "compute"
    return BenchResult(
        backend=runner.backend, precision=runner.precision, device=runner.device, shape=tuple(settings.shape),
        mode=mode, warmup=settings.warmup, iterations=len(times),
        latency_ms=stats, throughput_ips=(n * len(times) / wall) if wall else n / (stats["mean"] / 1000.0),
        cov=coefficient_of_variation(stats), peak_rss_mb=rss, threads=settings.threads or os.cpu_count(),
        concurrency=settings.concurrency, timing=timing, versions=versions(), machine=machine,
        device_latency_ms=latency_stats(dev_times) if dev_times else None, extras=extras)


def volume_windows(size: tuple[int, ...], window: SlidingWindow) -> int:
    """Windows the sliding window runs over one volume of ``size``."""
    from attunet_deploy.window import window_starts

    return math.prod(len(window_starts(max(s, r), r, window.overlap)) for s, r in zip(size, window.roi))


def bench_many(bundle: Bundle, backends: list[str], precisions: list[str], settings: BenchSettings,
               reporter: Reporter | None = None, **runner_options: Any
               ) -> tuple[list[BenchResult], list[Skip]]:
    """Time every (backend, precision) that can run here, in one process, one after another.

    Returns (results, skipped); each result gets ``ratio_vs_first`` (its p50 over the first's).
    """
    reporter = reporter or Reporter()
    pairs = registry.expand(backends, precisions, allow_auto=True, keep_unrunnable=True)
    threads = settings.threads or os.cpu_count() or 1
    settings = dataclasses.replace(settings, threads=threads)
    runners: list[Runner] = []
    skipped: list[Skip] = []
    try:
        for backend, precision in pairs:
            name = backend
            try:
                if backend == "auto":
                    name = resolve_auto(bundle, precision)
                reason = registry.check(bundle, name, precision)
                if reason is not None:
                    raise BackendUnavailable(reason)
                runners.append(open_runner(bundle, name, precision, threads=threads, spinning=False,
                                           **runner_options).activate())
            except BackendUnavailable as exc:
                skipped.append(Skip(name, precision, str(exc)))
        results = bench_runners(runners, settings, reporter) if runners else []
    finally:
        for runner in runners:
            runner.deactivate()
    return [r.with_ratio(results[0].p50) for r in results], skipped
