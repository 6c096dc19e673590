"""Which 16-bit mode the ``ov`` backend's fp16 row runs on this CPU: measured, not assumed.

Three candidates, those the CPU can run natively:

- ``f16``: ``model.fp16.onnx`` with an f16 inference hint (AVX-512 FP16, AMX-FP16);
- ``bf16``: ``model.onnx`` with a bf16 hint (AVX-512 BF16, AMX-BF16);
- ``f32``: ``model.fp16.onnx`` computed in f32 (any CPU).

A fixed rule picks the slowest on some CPUs: on an Intel Xeon with AVX-512 FP16 and no AMX, f16
ran the 2D demo at 67.7 ms per 256x256 image against 39.6 ms for FP32 (2026-11-27). So the first
time a bundle's fp16 row opens on a machine, each candidate is compiled and timed (interleaved, at
one 256x256 image or one sliding window) and checked against FP32 on the same input; the fastest
whose relative L2 is within the FP16 tolerance is kept in a per-machine cache keyed by CPU, ISA,
OpenVINO version and both graphs' sha256. ``ATTDEPLOY_AUTO_MEASURE=0`` turns measuring off: the
fixed rule below then applies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from attunet_deploy.bundle import ONNX_FILES, Bundle
from attunet_deploy.environment import machine_info, module_version

CACHE_FILE = "ov-16bit.json"
#: Relative L2 against FP32 a candidate may have (the FP16 verification tolerance).
EXACT_ENOUGH_REL_L2 = 1e-2
MEASURE_RUNS = 4


def candidates(isa: list[str]) -> list[tuple[str, str]]:
    """(hint, graph) of the 16-bit modes this CPU runs natively, and the f32 fallback."""
    out = []
    if any(f in isa for f in ("avx512_fp16", "amx_fp16")):
        out.append(("f16", ONNX_FILES["fp16"]))
    if any(f in isa for f in ("avx512_bf16", "amx_bf16")):
        out.append(("bf16", ONNX_FILES["fp32"]))
    out.append(("f32", ONNX_FILES["fp16"]))
    return out


def fixed_rule(isa: list[str]) -> tuple[str, str]:
    """(hint, graph) without measuring: bf16 on AMX, f16 on AVX-512 FP16 without AMX, else the
    FP16 graph computed in f32."""
    if "amx_bf16" in isa:
        return "bf16", ONNX_FILES["fp32"]
    if "avx512_fp16" in isa:
        return "f16", ONNX_FILES["fp16"]
    return "f32", ONNX_FILES["fp16"]


def _key(bundle: Bundle) -> str:
    m = machine_info()
    payload = {"cpu": m["cpu_model"], "cores": m["cores"], "isa": m["isa"], "openvino": module_version("openvino"),
               "graphs": [bundle.sha256(ONNX_FILES[p]) for p in ("fp32", "fp16")]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def valid_choice(entry: Any) -> bool:
    """An ``ov-16bit.json`` entry: the 16-bit hint chosen (bf16 or f16) and the graph it ran."""
    return isinstance(entry, dict) and entry.get("hint") in ("bf16", "f16")


def choose(bundle: Bundle, compile_fn: Callable[[str, str], Any]) -> tuple[str, str, dict[str, object]]:
    """(hint, graph, record) for the fp16 row: cached, measured (``compile_fn(graph, hint)`` gives a
    callable OpenVINO compiled model), or the fixed rule when measuring is off."""
    from attunet_deploy.runtimes.select import read_cache, write_cache

    isa = machine_info()["isa"]
    options = candidates(isa)
    if len(options) == 1:
        return (*options[0], {"chosen_by": "only option"})
    key = _key(bundle)
    entry = read_cache(CACHE_FILE, valid_choice).get(key)
    if entry is None and os.environ.get("ATTDEPLOY_AUTO_MEASURE", "1") == "0":
        hint, graph = fixed_rule(isa)
        return hint, graph, {"chosen_by": "fixed rule (ATTDEPLOY_AUTO_MEASURE=0)"}
    if entry is None:
        entry = measure(bundle, options, compile_fn)
        write_cache(key, entry, CACHE_FILE)
    hint = str(entry.get("hint"))
    chosen = dict(options).get(hint)
    if chosen is None:
        hint, graph = fixed_rule(isa)
        return hint, graph, {"chosen_by": "fixed rule (cached choice not runnable)"}
    return hint, chosen, {**entry, "chosen_by": "measured on this machine"}


def measure(bundle: Bundle, options: list[tuple[str, str]], compile_fn: Callable[[str, str], Any]
            ) -> dict[str, Any]:
    """Time every candidate on one input (interleaved) and check it against FP32; the fastest exact one."""
    spatial = bundle.sliding_window.roi if bundle.sliding_window else (256, 256)
    x = np.random.default_rng(0).random((1, bundle.in_channels, *spatial), dtype=np.float32)
    reference = np.asarray(compile_fn(ONNX_FILES["fp32"], "f32")([x])[0], dtype=np.float32)
    models = {hint: compile_fn(graph, hint) for hint, graph in options}
    times: dict[str, list[float]] = {h: [] for h in models}
    rel: dict[str, float] = {}
    for hint, model in models.items():
        out = np.asarray(model([x])[0], dtype=np.float32)
        rel[hint] = float(np.linalg.norm(out - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    for _ in range(MEASURE_RUNS):
        for hint, model in models.items():
            t0 = time.perf_counter()
            model([x])
            times[hint].append(time.perf_counter() - t0)
    p50 = {h: 1000.0 * float(np.median(t)) for h, t in times.items()}
    exact = [h for h in p50 if rel[h] <= EXACT_ENOUGH_REL_L2] or ["f32"]
    best = min(exact, key=lambda h: p50[h])
    return {"hint": best, "p50_ms": p50, "rel_l2_vs_fp32": rel, "shape": list(x.shape),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
