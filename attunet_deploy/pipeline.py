"""``attdeploy pipeline``: export -> quantize -> build (if GPU) -> verify all -> bench all -> report."""

from __future__ import annotations

import os
from typing import Any

from .console import Reporter


def run_pipeline(model: str | None, out: str | os.PathLike[str] = "deploy", *, calib: str | None = None,
                 trust_pickle: bool = False, force: bool = False, normalize: str | None = None,
                 bench_iterations: int = 20, shape: str | None = None, check_rel_l2: float = 1e-5,
                 reporter: Reporter | None = None, console: Any = None) -> int:
    """Run every step; returns 1 if any backend failed verification, else 0."""
    from .bench import BenchSettings, bench_many, parse_shape
    from .environment import tensorrt_probe
    from .export.onnx import export_bundle
    from .export.quantize import quantize_bundle
    from .report import bench_table, verify_table, write_report
    from .verify import summary_counts, verify

    reporter = reporter or Reporter()
    bundle, _ = export_bundle(model, out, trust_pickle=trust_pickle, force=force, normalize=normalize,
                              check_rel_l2=check_rel_l2, reporter=reporter)
    demo = bool(bundle.manifest["model"]["source"].get("demo"))
    precisions = ["fp16"]
    if demo or calib:
        precisions.append("int8")
    else:
        reporter.notice("INT8 skipped:", "a user model needs calibration images, pass --calib PATH")
    quantize_bundle(bundle, calib=calib, precisions=precisions, reporter=reporter, verify=False)

    notes: dict[str, Any] = {}
    trt = tensorrt_probe()
    if trt.available:
        from .export.tensorrt import build_engines

        build_engines(bundle, ["fp32", *precisions], reporter=reporter)
    else:
        reporter.notice("TensorRT engines skipped:", trt.detail)
        notes["TensorRT"] = f"Engines not built on this machine: {trt.detail}."

    rows = verify(bundle, ["all"], ["all"], reporter=reporter)
    shp = parse_shape(shape, bundle.in_channels) if shape else (1, bundle.in_channels, 256, 256)
    settings = BenchSettings(shape=shp, warmup=3, iterations=bench_iterations)
    runnable = sorted({r["backend"] for r in rows if r["status"] != "unavailable"},
                      key=["torch", "ort", "ort-cuda", "ort-trt", "trt"].index)
    results, _ = bench_many(bundle, runnable, ["fp32", "fp16", "int8"], settings, reporter=reporter)
    write_report(bundle, rows, results, extra=notes)
    if console is not None:
        console.print(verify_table(rows))
        if results:
            console.print(bench_table(results, title=f"Latency at {'x'.join(map(str, shp))} "
                                      f"(ratio vs {results[0]['backend']}/{results[0]['precision']})"))
        counts = summary_counts(rows)
        console.print(f"[bold]{counts['pass']} passed, {counts['fail']} failed, {counts['unavailable']} "
                      f"unavailable here[/bold] · report: {bundle.path('report.md')}", highlight=False)
    return 1 if summary_counts(rows)["fail"] else 0
