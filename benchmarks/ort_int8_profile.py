"""Why ONNX Runtime INT8 is no faster than FP32 on a CPU: time per operator type, FP32 and INT8 graphs
of the demo bundle, from ONNX Runtime's own profiler, plus the INT8 graph's activation variants.

    python benchmarks/ort_int8_profile.py [--runs 10] [--variants] [--out benchmarks/results]

Per op type: milliseconds per run summed over the nodes of that type (what ORT's profiler records
as kernel time), and the node count. ``--variants`` also quantises the same graph with unsigned
asymmetric activations (the u8 x s8 layout x86 VNNI multiplies natively; TensorRT rejects it) and
with convolution outputs left in float, and times every graph interleaved at 1x1x256x256 with
its mean Dice on the golden set. Writes ort_int8_profile.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attunet_deploy.bundle import Bundle  # noqa: E402
from attunet_deploy.console import RichReporter  # noqa: E402
from attunet_deploy.environment import machine_info, module_version  # noqa: E402

SHAPE = (1, 1, 256, 256)


def session(path: Path, profile_prefix: str | None = None) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def per_op(path: Path, runs: int, tmp: str) -> dict[str, dict[str, float]]:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    s = session(path, os.path.join(tmp, path.stem))
    for _ in range(3 + runs):
        s.run(None, {"image": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = 3 + runs
    return {op: {"ms": d / n / 1000.0, "nodes": count[op] // n} for op, d in total.most_common()}


def variants(bundle: Bundle, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from attunet_deploy.build.int8 import QUANTIZED_OPS, calibrate, float_nodes, input_rank, quantizer_options
    from attunet_deploy.steps.quantize import calibration_inputs

    src = bundle.onnx_path("fp32")
    inputs = calibration_inputs(bundle, None, 64).inputs
    cache = tmp / "ranges.json"
    save_tensors_data(calibrate(src, inputs, "percentile"), cache)
    out = {}
    for name, act, sym, no_conv_out in (("s8 symmetric, conv outputs float", QuantType.QInt8, True, True),
                                        ("u8 asymmetric", QuantType.QUInt8, False, False),
                                        ("u8 asymmetric, conv outputs float", QuantType.QUInt8, False, True)):
        extra = {"ActivationSymmetric": sym, "WeightSymmetric": True, "QuantizeBias": False,
                 "DedicatedQDQPair": False, "QDQOpTypePerChannelSupportToAxis": {"Conv": 0},
                 **quantizer_options(input_rank(src))}
        if no_conv_out:
            extra["OpTypesToExcludeOutputQuantization"] = ["Conv"]
        path = tmp / f"variant{len(out)}.onnx"
        quantize_static(str(src), str(path), None, quant_format=QuantFormat.QDQ, activation_type=act,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=float_nodes(src),
                        calibrate_method=CalibrationMethod.Percentile, calibration_cache_path=str(cache),
                        extra_options=extra)
        out[name] = path
    return out


def timed(paths: dict[str, Path], bundle: Bundle, iterations: int) -> list[dict[str, object]]:
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.segmenter import Segmenter
    from attunet_deploy.steps.quantize import evaluate_int8

    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"image": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(iterations):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"image": x})
            times[k].append(1000.0 * (time.perf_counter() - t0))
    cases = load_golden(bundle)
    base = statistics.median(times["FP32"])
    return [{"graph": k, "p50_ms": statistics.median(v), "vs_fp32": statistics.median(v) / base,
             "mean_dice": None if k == "FP32" else evaluate_int8(paths[k], cases, Segmenter(bundle.spec))[0]}
            for k, v in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--demo-bundle", type=Path, default=ROOT / "benchmarks" / "results" / "demo_bundle")
    args = parser.parse_args()
    from run_benchmarks import demo_bundle

    bundle = demo_bundle(args.demo_bundle, RichReporter())
    with tempfile.TemporaryDirectory() as tmp:
        profile = {k: per_op(bundle.onnx_path(p), args.runs, tmp) for k, p in (("FP32", "fp32"), ("INT8", "int8"))}
        graphs = {"FP32": bundle.onnx_path("fp32"), "INT8 (the bundle's)": bundle.onnx_path("int8")}
        if args.variants:
            graphs.update(variants(bundle, Path(tmp)))
        rows = timed(graphs, bundle, args.iterations)
    mach = machine_info()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": mach, "onnxruntime": module_version("onnxruntime")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_int8_profile.json").write_text(json.dumps({"meta": meta, "per_op": profile, "graphs": rows},
                                                               indent=2) + "\n")
    lines = [f"# ONNX Runtime INT8 against FP32, per operator type ({meta['date']})", "",
             f"Machine: {mach['cpu_model']}, {mach['cores']} cores, ISA {' '.join(mach['isa']) or '-'}; "
             f"onnxruntime {meta['onnxruntime']}; demo model at {'x'.join(map(str, SHAPE))}.", "",
             "| graph | op type | nodes | ms per run |", "|---|---|---|---|"]
    for g, ops in profile.items():
        lines += [f"| {g} | {op} | {v['nodes']} | {v['ms']:.2f} |" for op, v in list(ops.items())[:12]]
    lines += ["", "| graph | p50 ms | vs FP32 | mean Dice vs FP32 |", "|---|---|---|---|"]
    lines += [f"| {r['graph']} | {r['p50_ms']:.2f} | {r['vs_fp32']:.3f} | "
              f"{'-' if r['mean_dice'] is None else format(r['mean_dice'], '.4f')} |" for r in rows]
    (args.out / "ort_int8_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
