"""``attdeploy pipeline``: export -> quantize -> build (if GPU) -> verify all -> bench all -> report.

Each step is its own transaction (export, quantize, build, then the verification record and the
report), committed only when the step succeeded: a pipeline that fails or is interrupted in a
step leaves the bundle as the previous step committed it. A verification that misses its
tolerance is a *result* of the pipeline, not a failure of a step: it is recorded in the report
and the manifest, and the pipeline exits 1.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.judge.results import Status
from attunet_deploy.runtimes import registry

if TYPE_CHECKING:
    from attunet_deploy.steps.export import ExportSettings


def run_pipeline(export: ExportSettings, *, calib: str | None = None, bench_iterations: int = 20,
                 shape: str | None = None, reporter: Reporter | None = None, console: Any = None) -> int:
    """Run every step; returns 1 if any backend failed verification, else 0. ``calib`` calibrates INT8
    and, without ``export.images``, is also the image set a quarter of is held out from."""
    from attunet_deploy.environment import tensorrt_probe
    from attunet_deploy.steps.export import export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    reporter = reporter or Reporter()
    if export.images is None and calib is not None:
        export = replace(export, images=calib)  # --calib serves as --images (a quarter is held out)
    bundle, _ = export_bundle(export, reporter=reporter)
    precisions = ["fp16"]
    notes: dict[str, str] = {}
    if bundle.is_demo or calib:
        # --images alone or --calib alone: calibration takes what verification did not hold out. One
        # image (or too few) leaves nothing: both skip INT8 with the same notice and exit 0.
        golden = bundle.golden
        if golden.user_data and not golden.calibration_candidates \
                and (calib is None or str(calib) == str(export.images)):
            reporter.notice("INT8 skipped:", "every image is held out for verification; give more images")
            notes["INT8"] = "Skipped: every image was held out for verification (give more images)."
        else:
            precisions.append("int8")
    else:
        reporter.notice("INT8 skipped:", "a user model needs calibration images, pass --calib PATH")
        notes["INT8"] = "Skipped: a user model needs calibration images (--calib PATH)."
    bundle = quantize_bundle(bundle, QuantizeSettings(calib=calib, precisions=tuple(precisions), verify=False),
                             reporter=reporter).bundle

    trt = tensorrt_probe()
    if trt.available:
        from attunet_deploy.steps.engines import build_engines

        bundle = build_engines(bundle, ["fp32", *precisions], reporter=reporter).bundle
    else:
        reporter.notice("TensorRT engines skipped:", trt.detail)
        notes["TensorRT"] = f"Engines not built on this machine: {trt.detail}."

    return judge_and_report(bundle, notes, bench_iterations=bench_iterations, shape=shape, reporter=reporter,
                            console=console)


def judge_and_report(bundle: Bundle, notes: dict[str, str], *, bench_iterations: int = 20, shape: str | None = None,
                     reporter: Reporter | None = None, console: Any = None) -> int:
    """The pipeline's last steps on a built bundle: verify all, bench what ran, then record the
    verification and write report.json/.md/.html in one transaction. Returns 1 if a row failed."""
    from attunet_deploy.judge.bench import BenchSettings, bench_many, default_shape
    from attunet_deploy.judge.report import bench_table, verify_table
    from attunet_deploy.judge.report_html import report_files
    from attunet_deploy.judge.verify import summary_counts, verify
    from attunet_deploy.preprocess import parse_shape

    reporter = reporter or Reporter()
    rows = verify(bundle, ["all"], ["all"], reporter=reporter)
    shp = parse_shape(shape, bundle.in_channels, bundle.spatial_dims) if shape else default_shape(bundle)
    settings = BenchSettings(shape=shp, warmup=3, iterations=bench_iterations)
    runnable = sorted({r.backend for r in rows if r.status != Status.UNAVAILABLE}, key=registry.BACKENDS.index)
    results, _ = bench_many(bundle, runnable, ["all"], settings, reporter=reporter)
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.degenerate import golden_warnings

    warnings = golden_warnings(bundle, load_golden(bundle))
    files = report_files(bundle, rows, results, extra=notes, warnings=warnings)
    with bundle.transaction() as txn:
        txn.record_verification(rows)
        for name, text in files.items():
            txn.stage(name).write_text(text, encoding="utf-8")
        bundle = txn.commit()
    if console is not None:
        console.print(verify_table(rows))
        if results:
            console.print(bench_table(results, title=f"Latency at {'x'.join(map(str, shp))} "
                                      f"(ratio vs {results[0].name})"))
        counts = summary_counts(rows)
        console.print(f"[bold]{counts['pass']} passed, {counts['fail']} failed, {counts['unavailable']} "
                      f"unavailable here[/bold] · report: {bundle.path('report.html')}", highlight=False)
        from rich.markup import escape

        for w in warnings:  # beside the verdict, where the reader looks
            console.print(f"[bold red]warning:[/bold red] {escape(w)}", highlight=False)
    return 1 if summary_counts(rows)[Status.FAIL] else 0
