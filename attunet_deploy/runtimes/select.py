"""Opening runners: :func:`open_runner`, what ``backend="auto"`` means here, and the measured-speed
cache behind it (the public entry, which also resolves ``precision="best"``, is
:func:`attunet_deploy.loader.load_runner`).

``auto`` picks OpenVINO over ONNX Runtime CPU only where it was measured faster on this
machine, for this graph and precision.

A measurement (a few runs of each at 1xCx256x256, interleaved) is made the first time it is
needed and kept in a small per-machine cache (``$ATTDEPLOY_CACHE_DIR``, else
``$XDG_CACHE_HOME/attunet-deploy``, else ``~/.cache/attunet-deploy``), keyed by CPU, graph
sha256, precision and library versions. ``ATTDEPLOY_AUTO_MEASURE=0`` turns measuring off
(auto then keeps ONNX Runtime unless a cached measurement says otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.bundle import ONNX_FILES, Bundle
from attunet_deploy.environment import machine_info, module_version, versions
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import check, runner_class

#: ``backend="auto"`` tries these in order and takes the first that can run here; OpenVINO only
#: where it was measured faster than ONNX Runtime CPU on this machine.
AUTO_ORDER = ("trt", "ort-cuda", "ov", "ort")
CACHE_FILE = "auto-backend.json"
MEASURE_SHAPE_HW = (256, 256)
MEASURE_RUNS = 4


def cache_dir() -> Path:
    explicit = os.environ.get("ATTDEPLOY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attunet-deploy"


def cache_key(bundle: Bundle, precision: str, a: str, b: str) -> str:
    m = machine_info()
    v = versions()
    payload = {"cpu": m["cpu_model"], "cores": m["cores"], "isa": m["isa"], "a": a, "b": b, "precision": precision,
               "graph": bundle.sha256(ONNX_FILES[precision]),
               "onnxruntime": v.get("onnxruntime"), "openvino": _ov_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _ov_version() -> str | None:
    return module_version("openvino")


#: A per-machine cache file is a few entries of a few hundred bytes each.
CACHE_LIMIT = limits.Limit("ATTDEPLOY_MAX_CACHE_MB", 1, "MB", "per-machine cache file")


def _drop(path: Path, why: str) -> None:
    """An invalid cache file: deleted (it is re-measured), said once on stderr."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
    except OSError:
        pass
    print(f"note: cache file {path} is invalid ({why}): deleted", file=sys.stderr)


def read_cache(name: str = CACHE_FILE, valid: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """One per-machine measurement cache file (key -> entry), read as untrusted input: a regular file
    (never a FIFO or a device: opened non-blocking and checked before reading), at most CACHE_LIMIT,
    JSON of bounded depth holding an object; entries ``valid`` refuses are dropped. Anything else is
    deleted with a note and reads as empty (the value is measured again)."""
    path = cache_dir() / name
    if not os.path.lexists(path):
        return {}
    try:
        text = limits.read_bounded(path, CACHE_LIMIT, "cache file").decode("utf-8")
        if not limits.json_depth_ok(text, 8):
            raise ValueError("nested too deep")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (InputError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _drop(path, str(exc).split(":")[-1].strip()[:80] or type(exc).__name__)
        return {}
    if valid is not None:
        bad = [k for k, v in data.items() if not valid(v)]
        if bad:
            for k in bad:
                del data[k]
            _rewrite(path, data)
            print(f"note: cache file {path}: {len(bad)} invalid entr{'y' if len(bad) == 1 else 'ies'} deleted",
                  file=sys.stderr)
    return data


def _rewrite(path: Path, data: dict[str, Any]) -> None:
    from attunet_deploy.fileio import write_json_atomic

    try:
        write_json_atomic(path, data)
    except OSError:
        pass  # a cache that cannot be written is simply not kept


def write_cache(key: str, entry: dict[str, Any], name: str = CACHE_FILE) -> None:
    """Keep a measurement; a cache that cannot be written is simply not kept."""
    data = read_cache(name)
    data[key] = entry
    _rewrite(cache_dir() / name, data)


def valid_timings(entry: Any) -> bool:
    """An ``auto-backend.json`` entry: p50 seconds of known backends, finite and positive."""
    from attunet_deploy.runtimes.registry import BACKENDS

    p50 = entry.get("p50_s") if isinstance(entry, dict) else None
    return isinstance(p50, dict) and bool(p50) and all(
        k in BACKENDS and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 3600
        for k, v in p50.items())


def _load() -> dict[str, Any]:
    return read_cache(CACHE_FILE, valid_timings)


def record(key: str, timings: dict[str, float]) -> None:
    """Keep a measurement of ``auto``'s comparison."""
    write_cache(key, {"p50_s": timings, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def measure(bundle: Bundle, precision: str, backends: tuple[str, ...]) -> dict[str, float]:
    """p50 seconds of each backend at 1xCx256x256, a few interleaved runs after one warm-up."""
    x = np.random.default_rng(0).random((1, bundle.in_channels, *MEASURE_SHAPE_HW), dtype=np.float32)
    p50 = measure_pairs(bundle, [(b, precision) for b in backends], x, MEASURE_RUNS)
    return {b: p50[(b, precision)] for b in backends}


def measure_pairs(bundle: Bundle, pairs: list[tuple[str, str]], x: np.ndarray, runs: int,
                  **options: Any) -> dict[tuple[str, str], float]:
    """p50 seconds of each (backend, precision) on ``x``: every runner opened, one warm-up call each,
    then ``runs`` calls round-robin, so a busy moment of the machine hits every runner alike."""
    runners = [runner_class(b)(bundle, p, **{"self_check": False, **options}).activate() for b, p in pairs]
    try:
        times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
        for r in runners:
            r.infer(x)
        for _ in range(runs):
            for pair, r in zip(pairs, runners):
                t0 = time.perf_counter()
                r.infer(x)
                times[pair].append(time.perf_counter() - t0)
    finally:
        for r in runners:
            r.deactivate()
    return {pair: float(np.median(t)) for pair, t in times.items()}


def faster(bundle: Bundle, precision: str, candidate: str = "ov", baseline: str = "ort") -> bool:
    """True when ``candidate`` was measured faster than ``baseline`` here (measuring if needed)."""
    key = cache_key(bundle, precision, candidate, baseline)
    entry = _load().get(key)
    if entry is None:
        if os.environ.get("ATTDEPLOY_AUTO_MEASURE", "1") == "0":
            return False
        try:
            timings = measure(bundle, precision, (candidate, baseline))
        except Exception:
            return False  # a backend that fails to run is not faster
        record(key, timings)
        entry = {"p50_s": timings}
    p50 = entry.get("p50_s", {})
    try:
        return float(p50[candidate]) < float(p50[baseline])
    except (KeyError, TypeError, ValueError):
        return False


def resolve_auto(bundle: Bundle, precision: str) -> str:
    """The backend ``auto`` means here: the first of AUTO_ORDER that can run ``precision``."""
    reasons = []
    for candidate in AUTO_ORDER:
        reason = check(bundle, candidate, precision)
        if reason is None and candidate == "ov" and not faster(bundle, precision, "ov", "ort"):
            reason = "not measured faster than ort on this machine"
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailable(f"no backend can run {precision} here: " + "; ".join(reasons))


def open_runner(bundle: Bundle, backend: str, precision: str, **options: Any) -> Runner:
    """A runner (not yet activated) for a named backend; InputError for an unknown name,
    BackendUnavailable with the reason when it cannot run here."""
    runner_class(backend)  # an unknown name is a usage error (InputError), not "unavailable"
    reason = check(bundle, backend, precision)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend} unavailable: {reason}")
    return runner_class(backend)(bundle, precision, **options)
