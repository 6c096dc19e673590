"""Benchmark the demo model (base 16) and the full-size Attention U-Net (in 3 / out 1 / base 64)
on every backend and precision available here, and the 3D demo at one window and one whole CT volume.

    python benchmarks/run_benchmarks.py [--iterations 10] [--shapes 1x3x256x256 ...] [--out benchmarks/results]
                                        [--sections 2d 3d]

Steps: build a full-size checkpoint with random weights and realistic BatchNorm statistics,
export it, make FP16 and INT8 graphs (INT8 calibrated on CT phantoms stacked to 3 channels),
export and quantise the demo model too, then time every available (backend, precision) with
one method (bench.bench_runners: warm-up, interleaved round-robin iterations). Also counts the
model's FLOPs and measures this machine's FP32 and INT8 GEMM rates as roofs. Every record names
the CPU, its core count and the ISA flags that matter. Writes results.json, results.md and
latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from attunet_deploy.environment import cuda_devices, machine_info, versions  # noqa: E402
from attunet_deploy.judge.bench import BenchSettings, bench_many  # noqa: E402
from attunet_deploy.preprocess import parse_shape  # noqa: E402

DEFAULT_SHAPES = ("1x3x256x256", "1x3x512x512", "4x3x256x256")


def realistic_checkpoint(path: Path, seed: int = 0) -> None:
    """Random weights; BatchNorm statistics from running the network on phantom images in
    training mode, so activations have realistic scales (as after real training)."""
    import torch

    from attunet_deploy.checkpoint import save_checkpoint
    from attunet_deploy.demo import make_phantoms, window
    from attunet_deploy.models.attunet2d import AttentionUNet, AttentionUNetConfig

    torch.manual_seed(seed)
    model = AttentionUNet(AttentionUNetConfig(3, 1, 64))
    hu, _ = make_phantoms(16, seed=seed + 100, size=(128, 128))
    x = torch.from_numpy(np.repeat(window(hu), 3, axis=1))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes below
    with torch.no_grad():
        for i in range(0, 16, 4):
            model(x[i:i + 4])
    save_checkpoint(model.eval(), path, meta={"note": "benchmark model: random weights, BN stats from phantoms"})


def conv_flops(shape: tuple[int, int, int, int]) -> float:
    """FLOPs (2 x multiply-adds) of the full-size model's convolutions at ``shape``."""
    import torch

    from attunet_deploy.models.attunet2d import AttentionUNet, AttentionUNetConfig

    model = AttentionUNet(AttentionUNetConfig(3, 1, 64)).eval()
    total = 0

    def hook(mod: torch.nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, *shape[1:]))
    for h in handles:
        h.remove()
    return 2.0 * total * shape[0]


def gemm_roof_gflops(threads: int, sizes: tuple[int, ...] = (2048, 3072), repeats: int = 8) -> float:
    """Best FP32 GEMM rate of this machine in GFLOP/s: the fastest of torch.mm (oneDNN/MKL) and
    numpy.matmul (OpenBLAS) at a few sizes, same thread count. A shared machine only ever makes
    a GEMM slower, so the best run is the closest to the hardware's real roof."""
    import torch

    torch.set_num_threads(threads)
    best_rate = 0.0
    for n in sizes:
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        na, nb = ta.numpy(), tb.numpy()
        for fn, a, b in ((torch.mm, ta, tb), (np.matmul, na, nb)):
            fn(a, b)
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(a, b)
                best_rate = max(best_rate, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best_rate


def bf16_gemm_roof_gflops(threads: int, sizes: tuple[int, ...] = (2048, 3072), repeats: int = 6) -> float:
    """Best BF16 GEMM rate in GFLOP/s: torch.mm on bfloat16 (oneDNN: AMX-BF16 tiles where the CPU
    has them, else AVX-512 BF16 dot products, else a conversion to FP32)."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        torch.mm(a, b)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def matrix_units(isa: list[str]) -> dict[str, str]:
    """Which units the INT8 and BF16 roofs measure on this CPU (AMX only where its flags are present)."""
    return {"int8": "AMX-INT8" if "amx_int8" in isa else "AVX-512 VNNI" if "avx512_vnni" in isa
            else "AVX-VNNI" if "avx_vnni" in isa else "AVX2 (no int8 dot product)",
            "bf16": "AMX-BF16" if "amx_bf16" in isa else "AVX-512 BF16" if "avx512_bf16" in isa
            else "none (converted to FP32)"}


def int8_gemm_roof_gops(threads: int, sizes: tuple[int, ...] = (2048, 3072), repeats: int = 6) -> float:
    """Best INT8 GEMM rate (int32 accumulation) in GOP/s: ONNX Runtime's MatMulInteger (the MLAS
    u8 x s8 kernels its int8 convolutions use) and torch._int_mm, same thread count."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    best = 0.0
    for n in sizes:
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm",
                                  [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
                                   helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
                                  [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                    .SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = rng.integers(-127, 127, (n, n), dtype=np.int8)
        ta, tb = torch.from_numpy(a.astype(np.int8) // 2), torch.from_numpy(b)
        runs = [lambda sess=sess, a=a, b=b: sess.run(None, {"A": a, "B": b})]
        if hasattr(torch, "_int_mm"):
            runs.append(lambda ta=ta, tb=tb: torch._int_mm(ta, tb))
        for fn in runs:
            try:
                fn()
            except RuntimeError:
                continue
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def demo_bundle(path: Path, reporter: object) -> Bundle:
    """The bundled demo model exported and quantised (made on the first run, reused after)."""
    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    if not (path / "manifest.json").exists():
        export_bundle(ExportSettings(None, path), reporter=reporter)
        quantize_bundle(Bundle.load(path), QuantizeSettings(verify=False), reporter=reporter)
    return Bundle.load(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--bundle", type=Path, default=ROOT / "benchmarks" / "results" / "bundle",
                        help="Full-size bundle: made here on the first run, reused after.")
    parser.add_argument("--demo-bundle", type=Path, default=ROOT / "benchmarks" / "results" / "demo_bundle",
                        help="Demo-model bundle: made here on the first run, reused after.")
    parser.add_argument("--demo-iterations", type=int, default=40)
    parser.add_argument("--sections", nargs="+", choices=["2d", "3d"], default=["2d", "3d"],
                        help="2d: the demo and full-size 2D models; 3d: the 3D demo (results_3d.{json,md}).")
    parser.add_argument("--demo3d-bundle", type=Path, default=ROOT / "benchmarks" / "results" / "demo3d_bundle",
                        help="3D demo bundle: made here on the first run, reused after.")
    parser.add_argument("--volume-rounds", type=int, default=3, help="Timed rounds of the whole 3D volume.")
    args = parser.parse_args()
    if "3d" in args.sections:
        run_3d(args)
    if "2d" not in args.sections:
        return

    from attunet_deploy.judge.report import bench_table, markdown_table
    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    reporter = RichReporter()
    threads = os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attdeploy-bench-") as tmp:
        bundle_dir = args.bundle
        if not (bundle_dir / "manifest.json").exists():
            ckpt = Path(tmp) / "full.pt"
            with reporter.step("Making the full-size checkpoint (BatchNorm statistics from phantoms)"):
                realistic_checkpoint(ckpt)
            # docs/design.md's FP32 tolerance: BatchNorm folded by the exporter reorders float32 sums.
            export_bundle(ExportSettings(ckpt, bundle_dir, check_rel_l2=1e-4), reporter=reporter)
            from attunet_deploy.demo import make_phantoms, window

            calib = Path(tmp) / "calib.npy"
            hu, _ = make_phantoms(32, seed=7, size=(256, 256))
            np.save(calib, np.repeat(window(hu), 3, axis=1))
            quantize_bundle(Bundle.load(bundle_dir), QuantizeSettings(calib=str(calib), max_samples=32, verify=False),
                            reporter=reporter)
        bundle = Bundle.load(bundle_dir)
        with reporter.step("Measuring the FP32, BF16 and INT8 GEMM roofs"):
            roof = gemm_roof_gflops(threads)
            roof8 = int8_gemm_roof_gops(threads)
            roof16 = bf16_gemm_roof_gflops(threads)
        records = []
        demo = demo_bundle(args.demo_bundle, reporter)
        settings = BenchSettings(shape=(1, 1, 256, 256), warmup=5, iterations=args.demo_iterations, threads=threads)
        # bench_many's typed records are read-only: the rows of this page are their dicts plus the model
        demo_results = [{**r.to_dict(), "model": "demo (base 16)"}
                        for r in bench_many(demo, ["ort", "ov", "torch"], ["fp32", "int8", "fp16"], settings,
                                            reporter)[0]]
        reporter.console.print(bench_table(demo_results, title="Demo model at 1x1x256x256"))
        for text in args.shapes:
            shape = parse_shape(text, bundle.in_channels)
            settings = BenchSettings(shape=shape, warmup=args.warmup, iterations=args.iterations, threads=threads)
            results = [r.to_dict() for r in bench_many(bundle, ["ort", "ov", "torch", "ort-cuda", "ort-trt", "trt"],
                                                       ["all"], settings, reporter)[0]]
            flops = conv_flops(shape)
            for r in results:
                r["model"] = "full size (base 64)"
                r["gflop"] = flops / 1e9
                r["achieved_gflops"] = flops / (r["latency_ms"]["p50"] / 1000.0) / 1e9
            reporter.console.print(bench_table(results, title=f"Full-size model at {text} "
                                               f"({flops / 1e9:.1f} GFLOP, roof {roof:.0f} GFLOP/s)"))
            records.extend(results)
        with reporter.step("Measuring the FP32, BF16 and INT8 GEMM roofs again"):
            roof = max(roof, gemm_roof_gflops(threads))
            roof8 = max(roof8, int8_gemm_roof_gops(threads))
            roof16 = max(roof16, bf16_gemm_roof_gflops(threads))
        for r in records:
            r["efficiency_vs_fp32_gemm_roof"] = r["achieved_gflops"] / roof
            r["efficiency_vs_int8_gemm_roof"] = r["achieved_gflops"] / roof8
            r["efficiency_vs_bf16_gemm_roof"] = r["achieved_gflops"] / roof16
            # each row against the roof of the arithmetic it runs: int8, bf16 (OpenVINO's bf16 mode), else fp32
            r["roof"] = "int8" if r["precision"] == "int8" else "bf16" if "bf16" in str(r.get("device")) else "fp32"

    cuda = cuda_devices()
    mach = machine_info()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": mach, "platform": platform.platform(),
            "gpu": cuda.extra.get("gpus") if cuda.available else None, "fp32_gemm_roof_gflops": roof,
            "int8_gemm_roof_gops": roof8, "bf16_gemm_roof_gflops": roof16, "matrix_units": matrix_units(mach["isa"]),
            "threads": threads, "versions": versions(include_torch=True)}
    records = demo_results + records
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    headers = ["model", "shape", "backend", "precision", "device", "p50 ms", "p90 ms", "p99 ms", "img/s", "CoV %",
               "vs ORT FP32", "GFLOP/s", "% of roof"]

    def ratio(r: dict) -> str:
        base = [x for x in records if x["shape"] == r["shape"] and x.get("model") == r.get("model")
                and x["backend"] == "ort" and x["precision"] == "fp32"]
        return f"{r['latency_ms']['p50'] / base[0]['latency_ms']['p50']:.2f}x" if base else "-"

    rows = [[r.get("model", ""), "x".join(map(str, r["shape"])), r["backend"], r["precision"], r.get("device", ""),
             f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p90']:.1f}", f"{r['latency_ms']['p99']:.1f}",
             f"{r['throughput_ips']:.2f}", f"{100 * r['cov']:.1f}", ratio(r),
             f"{r['achieved_gflops']:.0f}" if "achieved_gflops" in r else "-",
             (f"{100 * r['efficiency_vs_' + r['roof'] + '_gemm_roof']:.0f} ({r['roof']})"
              if "roof" in r else "-")] for r in records]
    md = [f"# Benchmark results ({meta['date']})", "",
          f"Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['arch']}, ISA {' '.join(mach['isa']) or '-'}; "
          f"threads {threads}; FP32 GEMM roof {roof:.0f} GFLOP/s; INT8 GEMM roof {roof8:.0f} GOP/s "
          f"({meta['matrix_units']['int8']}); BF16 GEMM roof {roof16:.0f} GFLOP/s ({meta['matrix_units']['bf16']}); "
          f"versions {meta['versions']}.", "",
          "p50 etc. per call; ratios are p50 against ONNX Runtime FP32 of the same model and shape, "
          "measured in the same interleaved run.", "", markdown_table(headers, rows), ""]
    (args.out / "results.md").write_text("\n".join(md))
    try:
        _chart(records, args.out / "latency.png")
    except ImportError:
        print("matplotlib missing: no chart (pip install 'attunet-deploy[bench]')")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}")


def run_3d(args: argparse.Namespace) -> None:
    """The 3D demo at one window and one whole CT volume (benchmarks/bench3d.py)."""
    import bench3d

    reporter = RichReporter()
    threads = os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = bench3d.demo3d_bundle(args.demo3d_bundle, reporter)
    window = bench3d.bench_window(bundle, threads, args.demo_iterations, reporter)
    volume = bench3d.bench_volume(bundle, threads, args.volume_rounds)
    mach = machine_info()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": mach, "platform": platform.platform(), "threads": threads,
            "versions": versions(include_torch=True)}
    (args.out / "results_3d.json").write_text(json.dumps({"meta": meta, "window": window, "volume": volume},
                                                         indent=2, default=str) + "\n")
    md = [f"# 3D benchmark results ({meta['date']})", "",
          f"Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['arch']}, ISA {' '.join(mach['isa']) or '-'}; "
          f"threads {threads}; versions {meta['versions']}.", "", *bench3d.markdown(window, volume)]
    (args.out / "results_3d.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.out / 'results_3d.json'}, {args.out / 'results_3d.md'}")


def _chart(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({"x".join(map(str, r["shape"])) for r in records}, key=lambda s: [int(v) for v in s.split("x")])
    names = list(dict.fromkeys(f"{r['backend']}/{r['precision']}" for r in records))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(names):
        vals = []
        for s in shapes:
            match = [r for r in records if f"{r['backend']}/{r['precision']}" == name
                     and "x".join(map(str, r["shape"])) == s]
            vals.append(match[0]["latency_ms"]["p50"] if match else 0)
        ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(shapes)) + width * (len(names) - 1) / 2, shapes)
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("Attention U-Net (base 64) latency by backend and precision")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
