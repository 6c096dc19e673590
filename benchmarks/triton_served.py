"""Served (Triton) vs in-process latency and throughput of the CPU model, at concurrency 1, 4, 16.

    python benchmarks/triton_served.py [-b BUNDLE] [--venv .venv-triton] [--shape 1x1x256x256] [--requests 12]
    python benchmarks/triton_served.py --demo 3d [--rounds 3]

``--demo 3d``: the 3D demo's ``attunet_volume`` (BLS; windows served by ``attunet_cpu``) on a whole
200x512x512 CT phantom at 2.5 x 0.78 x 0.78 mm, against ``segment_volume`` on ONNX Runtime in this
process, rounds interleaved; the served and in-process masks must be equal. Writes
benchmarks/results/triton_served_3d.json.

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
    ap.add_argument("--json", default=None, help="default: results/triton_served.json (3D: triton_served_3d.json)")
    ap.add_argument("--demo", choices=["2d", "3d"], default="2d")
    ap.add_argument("--rounds", type=int, default=3, help="3D: whole volumes timed per mode")
    args = ap.parse_args()
    if args.demo == "3d":
        args.json = args.json or str(HERE / "results" / "triton_served_3d.json")
        return served_volume(args)
    args.json = args.json or str(HERE / "results" / "triton_served.json")

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


def served_volume(args: argparse.Namespace) -> int:
    """Seconds per whole volume: attunet_volume in Triton vs segment_volume in this process."""
    import time

    import numpy as np
    import tritonclient.http as tc
    from tritonharness import serve

    from attunet_deploy import load_runner
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.demo.phantom3d import make_volume
    from attunet_deploy.environment import machine_info

    work = Path(tempfile.mkdtemp(prefix="attdeploy-triton-bench-"))
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    if not args.bundle:
        subprocess.run([sys.executable, "-m", "attunet_deploy.cli", "export", str(DEMO3D_WEIGHTS), "-o", str(bundle)],
                       check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "attunet_deploy.cli", "triton", "-b", str(bundle), "-o", str(work / "repo"),
                    "--kind", "cpu"], check=True, capture_output=True)
    spacing = (2.5, 0.78125, 0.78125)
    hu, _ = make_volume(2026, (200, 512, 512))
    times: dict[str, list[float]] = {"served": [], "in-process": []}
    with serve(work / "repo", args.venv, models=("attunet_cpu", "attunet_volume")) as server, \
            load_runner(bundle, backend="ort") as runner:
        client = tc.InferenceServerClient(server.http, network_timeout=600, connection_timeout=600)
        inputs = [tc.InferInput("volume", list(hu.shape), "FP32"), tc.InferInput("spacing", [3], "FP32")]
        inputs[0].set_data_from_numpy(hu)
        inputs[1].set_data_from_numpy(np.asarray(spacing, np.float32))
        try:
            for rnd in range(args.rounds + 1):  # round 0 warms both up
                t0 = time.perf_counter()
                served = client.infer("attunet_volume", inputs).as_numpy("mask")
                t1 = time.perf_counter()
                local = runner.segment_volume(hu, spacing=spacing)
                t2 = time.perf_counter()
                if not np.array_equal(served, local):
                    raise SystemExit("served and in-process masks differ")
                if rnd:
                    times["served"].append(t1 - t0)
                    times["in-process"].append(t2 - t1)
                print(f"  round {rnd}: served {t1 - t0:.2f} s, in-process {t2 - t1:.2f} s", flush=True)
        finally:
            client.close()
    result = {"volume": list(hu.shape), "spacing_mm": list(spacing), "rounds": args.rounds, "masks_equal": True,
              "served_s": float(np.median(times["served"])), "in_process_s": float(np.median(times["in-process"])),
              "runs": times, "machine": machine_info(),
              "served_model": "attunet_volume (BLS) -> attunet_cpu (ONNX Runtime in the python backend)"}
    result["served_over_in_process"] = result["served_s"] / result["in_process_s"]
    print(f"served {result['served_s']:.2f} s, in-process {result['in_process_s']:.2f} s per volume "
          f"({result['served_over_in_process']:.2f}x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
