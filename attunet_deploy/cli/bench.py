"""``attdeploy bench``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import (
    PRECISION_CHOICES,
    backend_choice,
    bundle_option,
    check_json_path,
    check_report_dir,
    load_bundle,
    report_option,
    reporter,
    runner_options,
    shape_option,
    triton_options,
    write_json,
)
from attunet_deploy.cli.render import print_bench
from attunet_deploy.errors import InputError


@main.command()
@bundle_option
@click.option("--backend", "backends", type=backend_choice(all_=True, auto=True), multiple=True, default=("auto",),
              show_default=True, help="Backend(s) to time (repeatable, or all); ratios are against the first.")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_CHOICES), multiple=True, default=("fp32",),
              show_default=True, help="Precision(s) to time (repeatable, or all).")
@shape_option
@click.option("--volume", default=None, metavar="NxCxDxHxW",
              help="3D bundles: time whole volumes of this shape through the sliding window (seconds per volume, "
                   "windows per second) instead of one input.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up iterations.")
@click.option("--iterations", type=int, default=None, help="Timed iterations (default 30).")
@click.option("--duration", type=float, default=None, help="Time for this many seconds instead.")
@click.option("--end-to-end", is_flag=True, help="Include normalisation, padding and copies.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch, ONNX Runtime and OpenVINO "
              "(default: all cores).")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Requests in flight at once (served models: throughput under load).")
@triton_options
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
@report_option
def bench(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], shape: str | None,
          volume: str | None, warmup: int, iterations: int | None, duration: float | None, end_to_end: bool,
          threads: int | None, concurrency: int, triton_url: str | None, triton_model: str | None,
          triton_timeout: float | None, json_path: str | None, report_dir: str | None) -> None:
    """Measure latency and throughput with one method for every backend."""
    from attunet_deploy.judge.bench import BenchSettings, bench_many, default_shape
    from attunet_deploy.preprocess import parse_shape

    if iterations is not None and duration is not None:
        raise InputError("give --iterations or --duration, not both")
    if volume is not None and (shape is not None or end_to_end or concurrency > 1):
        raise InputError("--volume times whole volumes: leave out --shape, --end-to-end and --concurrency")
    BenchSettings.check_options(warmup=warmup, iterations=iterations, duration=duration, threads=threads,
                                concurrency=concurrency)
    check_json_path(json_path, bundle_dir)
    check_report_dir(report_dir, bundle_dir, json_path=json_path)
    bundle = load_bundle(bundle_dir)
    if volume is not None:
        shp = parse_shape(volume, bundle.in_channels, 3)
    else:
        shp = parse_shape(shape, bundle.in_channels, bundle.spatial_dims) if shape else default_shape(bundle)
    settings = BenchSettings(shape=shp, warmup=warmup if volume is None else min(warmup, 1), iterations=iterations,
                             duration=duration, end_to_end=end_to_end, threads=threads, concurrency=concurrency,
                             volume=volume is not None)
    results, skipped = bench_many(bundle, list(backends), list(precisions), settings, reporter=reporter(),
                                  **runner_options(triton_url, triton_model, triton_timeout))
    if json_path != "-" and results:  # nothing timed: the one error line below says why, on stderr only
        print_bench(results, skipped, shp, end_to_end=end_to_end, concurrency=concurrency)
    write_json(json_path, {"bundle": str(bundle.root), "results": results, "skipped": skipped})
    if report_dir is not None and results:
        from attunet_deploy.judge.report_html import report_files, write_report_dir

        write_report_dir(report_dir, report_files(bundle, [], results))
    if not results:
        raise InputError("nothing could be timed: " + "; ".join(f"{sk.backend}/{sk.precision}: {sk.reason}"
                                                                 for sk in skipped)[:500])
