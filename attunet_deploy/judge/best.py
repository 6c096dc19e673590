"""``--precision best``: the fastest precision that passes verification for this bundle on this machine.

Every precision the bundle has a graph for is opened on the requested backend (``auto`` resolved
per precision, so INT8 may run on OpenVINO while FP32 runs on ONNX Runtime), verified here on the
bundle's golden set against the design's tolerances, and the passing ones are timed interleaved
at the bench's default shape. The fastest passing one is used. FP32 is the fallback: a precision
that fails verification here is never picked, whatever its speed.

The choice is measured once and kept in the per-machine cache (``runtimes.select.cache_dir()``,
file ``best-precision.json``), keyed by CPU, ISA flags, library versions and the sha256 of every
graph: a new machine, a new library or a re-quantised graph measures again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from attunet_deploy.bundle import ONNX_FILES, OV_INT8_XML, Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.environment import machine_info, module_version
from attunet_deploy.errors import BackendUnavailable
from attunet_deploy.judge.results import Status
from attunet_deploy.runtimes.registry import check
from attunet_deploy.runtimes.select import measure_pairs, read_cache, resolve_auto, write_cache
from attunet_deploy.segmenter import Segmenter

CACHE_FILE = "best-precision.json"
#: Timed calls per candidate (after one warm-up), round-robin.
RUNS = 5


@dataclass(frozen=True)
class Candidate:
    """One (backend, precision) considered: its verdict here, why, and its p50 (ms) when it passed."""

    backend: str
    precision: str
    status: str
    reason: str = ""
    p50_ms: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"backend": self.backend, "precision": self.precision, "status": self.status, "reason": self.reason,
                "p50_ms": self.p50_ms}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Candidate:
        p50 = d.get("p50_ms")
        return cls(str(d.get("backend", "?")), str(d.get("precision", "?")), str(d.get("status", "?")),
                   str(d.get("reason", "")), float(p50) if isinstance(p50, (int, float)) else None)


@dataclass(frozen=True)
class BestChoice:
    """The picked (backend, precision) and every candidate's verdict and p50 (ms) here."""

    backend: str
    precision: str
    candidates: tuple[Candidate, ...] = ()
    cached: bool = False

    def describe(self) -> str:
        parts = [f"{c.backend}/{c.precision} " + (f"{c.p50_ms:.1f} ms" if c.p50_ms is not None else c.status)
                 for c in self.candidates]
        return (f"{self.backend}/{self.precision}, the fastest that passes verification on this machine "
                f"({'; '.join(parts)}{'; cached' if self.cached else ''})")


def best_key(bundle: Bundle, backend: str) -> str:
    m = machine_info()
    graphs = {n: bundle.sha256(n) for n in (*ONNX_FILES.values(), OV_INT8_XML)}
    payload = {"cpu": m["cpu_model"], "cores": m["cores"], "isa": m["isa"], "backend": backend, "graphs": graphs,
               "libs": {k: module_version(k) for k in ("onnxruntime", "openvino", "tensorrt")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _candidates(bundle: Bundle, backend: str) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(backend, precision) pairs that can run here, and why the others cannot (reason -> pairs)."""
    out: list[tuple[str, str]] = []
    why: dict[str, list[str]] = {}
    for precision in ("int8", "fp16", "fp32"):
        if not bundle.has(ONNX_FILES[precision]):
            continue
        try:
            b = resolve_auto(bundle, precision) if backend == "auto" else backend
        except BackendUnavailable as exc:
            why.setdefault(str(exc), []).append(precision)
            continue
        reason = check(bundle, b, precision)
        if reason is None:
            out.append((b, precision))
        else:
            why.setdefault(reason, []).append(f"{b}/{precision}")
    return out, why


def valid_entry(entry: Any) -> bool:
    """A ``best-precision.json`` entry: a known backend and precision, and candidate records."""
    from attunet_deploy.runtimes.registry import BACKENDS

    return isinstance(entry, dict) and entry.get("backend") in BACKENDS and entry.get("precision") in ONNX_FILES \
        and isinstance(entry.get("candidates", []), list)


def _still_passes(bundle: Bundle, backend: str, precision: str, reporter: Reporter, **options: Any) -> bool:
    """A cached choice is input, not fact: it must run here, and pass verification here (checked
    again on the golden set: the cache file is writable by anyone who can edit it)."""
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, reference_gt_dice, run_backend

    if check(bundle, backend, precision) is not None:
        return False
    cases = load_golden(bundle)
    with reporter.step(f"Checking the cached choice {backend}/{precision} on the golden set"):
        row = run_backend(bundle, backend, precision, cases, DEFAULT_TOLERANCES[precision],
                          ref_gt_dice=reference_gt_dice(cases, Segmenter(bundle.spec)), **options)
    if row.status != Status.PASS:
        import sys

        print(f"note: cache file {CACHE_FILE}: the cached choice {backend}/{precision} does not pass verification "
              f"here ({row.reason or row.status}): chosen again", file=sys.stderr)
        return False
    return True


def resolve_best(bundle: Bundle, backend: str = "auto", reporter: Reporter | None = None,
                 **options: Any) -> BestChoice:
    """The fastest (backend, precision) of ``bundle`` that passes verification here (see the module)."""
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, reference_gt_dice, run_backend

    key = best_key(bundle, backend)
    entry = read_cache(CACHE_FILE, valid_entry).get(key)
    reporter = reporter or Reporter()
    if entry is not None and _still_passes(bundle, entry["backend"], entry["precision"], reporter, **options):
        return BestChoice(entry["backend"], entry["precision"],
                          tuple(Candidate.from_dict(c) for c in entry.get("candidates", []) if isinstance(c, dict)),
                          cached=True)
    candidates, why = _candidates(bundle, backend)
    if not candidates:
        raise BackendUnavailable(f"--precision best: no precision of this bundle can run on {backend} here: "
                                 + "; ".join(f"{', '.join(pairs)}: {reason}" for reason, pairs in why.items())[:400])
    cases = load_golden(bundle)
    ref_gt = reference_gt_dice(cases, Segmenter(bundle.spec))
    records: list[Candidate] = []
    with reporter.progress("Choosing the precision: verifying each here", len(candidates)) as advance:
        for b, p in candidates:
            row = run_backend(bundle, b, p, cases, DEFAULT_TOLERANCES[p], ref_gt_dice=ref_gt, **options)
            records.append(Candidate(b, p, str(row.status), row.reason))
            advance()
    passing = [(r.backend, r.precision) for r in records if r.status == Status.PASS.value]
    if not passing:
        raise BackendUnavailable("--precision best: no precision passes verification here: " + "; ".join(
            f"{r.backend}/{r.precision}: {r.reason or r.status}" for r in records)[:400])
    from attunet_deploy.judge.bench import default_shape

    x = np.random.default_rng(0).standard_normal(default_shape(bundle)).astype(np.float32)
    with reporter.step("Choosing the precision: timing the ones that pass"):
        p50 = {pair: 1000.0 * s for pair, s in measure_pairs(bundle, passing, x, RUNS, **options).items()}
    timed = tuple(dataclasses.replace(r, p50_ms=p50.get((r.backend, r.precision))) for r in records)
    b, p = min(passing, key=lambda pair: p50[pair])
    write_cache(key, {"backend": b, "precision": p, "candidates": [c.to_dict() for c in timed],
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, CACHE_FILE)
    return BestChoice(b, p, timed)
