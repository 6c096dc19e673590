"""Served (Triton) vs in-process latency and throughput of the CPU model, at concurrency 1, 4, 16.

    python benchmarks/triton_served.py [-b BUNDLE] [--venv .venv-triton] [--shape 1x1x256x256] [--requests 12]

Writes a Triton repository with `attdeploy triton --kind cpu`, serves `attunet_cpu` (ONNX Runtime
inside Triton's python backend, dynamic batching) on the tritonserver of the nvidia-pytriton
wheel on 127.0.0.1, and times it over HTTP with N concurrent clients (each sends --requests
requests) against the same graph on ONNX Runtime in this process with N threads. Same statistics
as `attdeploy bench` (bench.bench_concurrent). Writes benchmarks/results/triton_served.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The server harness the Triton tests use (starts and stops tritonserver on 127.0.0.1).
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-b", "--bundle", default=None, help="bundle (default: export the demo model)")
    ap.add_argument("--venv", default=str(HERE.parent / ".venv-triton"))
    ap.add_argument("--shape", default="1x1x256x256")
    ap.add_argument("--requests", type=int, default=12, help="requests per client")
    ap.add_argument("--json", default=str(HERE / "results" / "triton_served.json"))
    args = ap.parse_args()

    import numpy as np
    from tritonharness import serve

    from attunet_deploy import load_runner
    from attunet_deploy.environment import machine_info
    from attunet_deploy.judge.bench import BenchSettings, bench_concurrent, latency_stats
    from attunet_deploy.preprocess import pad_to_divisor, parse_shape

    work = Path(tempfile.mkdtemp(prefix="attdeploy-triton-bench-"))
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    if not args.bundle:
        subprocess.run([sys.executable, "-m", "attunet_deploy.cli", "export", "-o", str(bundle)], check=True,
                       capture_output=True)
    subprocess.run([sys.executable, "-m", "attunet_deploy.cli", "triton", "-b", str(bundle), "-o", str(work / "repo"),
                    "--kind", "cpu", "--max-batch", "16"], check=True, capture_output=True)
    shape = parse_shape(args.shape)
    x = pad_to_divisor(np.random.default_rng(0).random(shape, dtype=np.float32), 16)[0]
    rows = []
    with serve(work / "repo", args.venv) as server:
        for concurrency in (1, 4, 16):
            settings = BenchSettings(shape=shape, warmup=2, iterations=args.requests, concurrency=concurrency)
            for label, kwargs in (("served (Triton HTTP, attunet_cpu)", {"backend": "triton", "triton_url": server.http,
                                                                         "triton_model": "attunet_cpu"}),
                                  ("in-process (ONNX Runtime CPU)", {"backend": "ort"})):
                with load_runner(bundle, **kwargs) as runner:
                    for _ in range(settings.warmup):
                        runner.timed_infer(x)
                    times, wall = bench_concurrent(runner, settings, x)
                stats = latency_stats(times)
                rows.append({"mode": label, "concurrency": concurrency, "requests": len(times),
                             "latency_ms": stats, "throughput_ips": shape[0] * len(times) / wall})
                print(f"  {label:36s} c={concurrency:<3d} p50 {stats['p50']:8.1f} ms  p90 {stats['p90']:8.1f} ms  "
                      f"{rows[-1]['throughput_ips']:6.1f} img/s", flush=True)
    result = {"shape": list(shape), "machine": machine_info(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
