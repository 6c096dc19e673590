"""``attdeploy``: a thin click layer over the library. Exit 0 ok, 1 verification failed, 2 bad input.

Modules are imported inside commands so that ``attdeploy verify`` on a device without torch
never imports it, and ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import AttDeployError, InputError

BACKENDS = ("all", "auto", "torch", "ort", "ort-cuda", "ort-trt", "trt")
PRECISION_CHOICES = ("all", "fp32", "fp16", "int8")


class _Group(click.Group):
    """Turns AttDeployError into one stderr line and its exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("ATTDEPLOY_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except AttDeployError as exc:
            if debug:
                raise
            click.echo(f"error: {_one_line(exc)}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if debug:
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                       "(rerun with --debug for the traceback)", err=True)
            ctx.exit(3)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:600] if text else type(exc).__name__


def _reporter(quiet: bool = False) -> Any:
    from .console import RichReporter

    return RichReporter(quiet=quiet)


def _stdout() -> Any:
    from rich.console import Console

    # Pipes and CI logs get a wide table rather than rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def _write_json(path: str | None, data: Any) -> None:
    if path is None:
        return
    from .fileio import write_json_atomic

    if path == "-":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        write_json_atomic(path, data)


def _load_bundle(path: str) -> Any:
    from .bundle import Bundle

    return Bundle.load(path)


bundle_option = click.option("-b", "--bundle", "bundle_dir", default="deploy", show_default=True,
                             metavar="DIR", help="Bundle directory written by 'attdeploy export'.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="attunet-deploy", prog_name="attdeploy")
def main(debug: bool) -> None:
    """Attention U-Net: PyTorch checkpoint -> ONNX / INT8 / FP16 -> TensorRT, verified and benchmarked."""


# ------------------------------------------------------------------------------------ export
@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", default="deploy", show_default=True, metavar="DIR", help="Bundle directory.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled modules (runs their code).")
@click.option("--force", is_flag=True, help="Write into a non-empty directory that is not a bundle.")
@click.option("--normalize", default=None, metavar="SPEC",
              help="Input normalisation: none | ct-window:L,W | mean-std:M,S | scale:D | minmax "
                   "(demo: ct-window:40,400).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--check-rel-l2", type=float, default=1e-5, show_default=True,
              help="Tolerance of the ONNX Runtime vs PyTorch check run after export (exit 1 above it).")
def export(model: str | None, out: str, opset: int, trust_pickle: bool, force: bool, normalize: str | None,
           exporter: str, check_rel_l2: float) -> None:
    """Export MODEL (default: the bundled demo) to a bundle: weights, ONNX, golden set, manifest."""
    from .export.onnx import export_bundle
    from .report import verify_table

    _require_torch("export")
    bundle, row = export_bundle(model, out, opset=opset, trust_pickle=trust_pickle, force=force,
                                normalize=normalize, exporter=exporter, check_rel_l2=check_rel_l2,
                                reporter=_reporter())
    _print_bundle_summary(bundle)
    _stdout().print(verify_table([row], title=f"ONNX Runtime CPU vs PyTorch FP32 (export check, rel L2 <= "
                                              f"{check_rel_l2:g})"))


def _require_torch(command: str) -> None:
    from .environment import has_module

    if not has_module("torch"):
        raise InputError(f"'{command}' needs torch: pip install 'attunet-deploy[torch]' "
                         "(devices without torch can verify, bench and predict existing bundles)")


def _print_bundle_summary(bundle: Any) -> None:
    from rich.table import Table

    from .preprocess import describe_normalization

    m = bundle.manifest
    cfg = m["model"]["config"]
    table = Table(title=f"Bundle {bundle.root}", title_justify="left", show_header=True)
    table.add_column("artifact")
    table.add_column("precision")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    table.add_column("made by")
    for name, entry in sorted(bundle.artifacts.items()):
        prod = entry.get("producer", {})
        made = ", ".join(f"{k} {prod[k]}" for k in ("torch", "onnxruntime", "tensorrt", "exporter", "opset")
                         if k in prod)
        present = "" if bundle.path(name).exists() else " [red](missing)[/red]"
        table.add_row(name + present, entry.get("precision", "-"), _size(entry.get("bytes", 0)),
                      entry.get("sha256", "")[:12], made)
    out = _stdout()
    src = m["model"]["source"]
    out.print(f"AttentionUNet in={cfg['in_channels']} out={cfg['out_channels']} base={cfg['base_channels']}"
              f" · {src.get('parameters', '?'):,} parameters · from {src.get('layout')} "
              f"{Path(src.get('path', '')).name} · normalisation: {describe_normalization(m['preprocessing'])}"
              f" · post: {m['postprocessing']['kind']}", highlight=False)
    out.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------------------ quantize
@main.command()
@bundle_option
@click.option("--calib", type=click.Path(exists=False), default=None, metavar="PATH",
              help="Calibration images: a directory or file (.npy/.npz, PNG/TIFF, DICOM, NIfTI). "
                   "Default for the demo bundle: demo phantoms.")
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), default="percentile",
              show_default=True, help="Activation calibration method.")
@click.option("--max-samples", type=int, default=64, show_default=True, help="Calibration images used at most.")
@click.option("--quantize-all", is_flag=True, help="Also quantise the attention gates' psi branch and the head.")
@click.option("--precision", "precisions", type=click.Choice(["fp16", "int8"]), multiple=True,
              help="Make only these (default both).")
@click.option("--full-range-weights", is_flag=True,
              help="8-bit instead of 7-bit INT8 weights: for GPU-only targets (x86 CPUs without VNNI then run "
                   "ONNX Runtime's slower exact int8 path).")
@click.option("--fp16-keep-fp32", "keep_fp32", multiple=True, metavar="NODE",
              help="Run this ONNX node in FP32 inside the FP16 graph (repeatable), e.g. where activations "
                   "overflow FP16.")
def quantize(bundle_dir: str, calib: str | None, method: str, max_samples: int, quantize_all: bool,
             precisions: tuple[str, ...], full_range_weights: bool, keep_fp32: tuple[str, ...]) -> None:
    """Write model.fp16.onnx and model.int8.onnx (Q/DQ) and verify them on ONNX Runtime CPU."""
    from .export.quantize import quantize_bundle
    from .report import verify_table

    bundle = _load_bundle(bundle_dir)
    rows = quantize_bundle(bundle, calib=calib, method=method, max_samples=max_samples,
                           quantize_all=quantize_all, precisions=list(precisions) or ["fp16", "int8"],
                           full_range_weights=full_range_weights, fp16_keep_fp32=list(keep_fp32),
                           reporter=_reporter())
    _stdout().print(verify_table(rows, title="Quantised graphs on ONNX Runtime CPU vs PyTorch FP32"))
    if any(r["status"] == "fail" for r in rows):
        from .errors import VerificationFailed

        raise VerificationFailed("a quantised graph missed its tolerance (see the table); try another --method "
                                 "or a more representative --calib set")


# ------------------------------------------------------------------------------------ build
@main.command()
@bundle_option
@click.option("--precision", "precisions", type=click.Choice(["fp32", "fp16", "int8"]), multiple=True,
              required=True, help="Engine precision (repeatable).")
@click.option("--min-shape", "min_shapes", multiple=True, metavar="NxCxHxW", help="Profile minimum (repeatable).")
@click.option("--opt-shape", "opt_shapes", multiple=True, metavar="NxCxHxW", help="Profile optimum (repeatable).")
@click.option("--max-shape", "max_shapes", multiple=True, metavar="NxCxHxW", help="Profile maximum (repeatable).")
@click.option("--workspace-mb", type=int, default=None, help="Builder workspace cap (default: a safe share of "
              "free device memory).")
@click.option("--force", is_flag=True, help="Rebuild even if a matching engine is cached.")
def build(bundle_dir: str, precisions: tuple[str, ...], min_shapes: tuple[str, ...], opt_shapes: tuple[str, ...],
          max_shapes: tuple[str, ...], workspace_mb: int | None, force: bool) -> None:
    """Build TensorRT engines on this device from the bundle's ONNX graphs."""
    from .export.tensorrt import build_engines, parse_profiles

    bundle = _load_bundle(bundle_dir)
    profiles = parse_profiles(min_shapes, opt_shapes, max_shapes, channels=bundle.in_channels,
                              divisor=bundle.divisor)
    results = build_engines(bundle, list(precisions), profiles, workspace_mb=workspace_mb, force=force,
                            reporter=_reporter())
    from rich.table import Table

    table = Table(title="TensorRT engines", title_justify="left")
    for col in ("precision", "engine", "status", "layers by precision", "build s"):
        table.add_column(col)
    for r in results:
        table.add_row(r["precision"], r["engine"], r["status"],
                      ", ".join(f"{k} {v}" for k, v in r.get("layer_precisions", {}).items()),
                      f"{r.get('build_seconds', 0):.1f}")
    _stdout().print(table)


# ------------------------------------------------------------------------------------ verify
def _tolerance_options(f: Any) -> Any:
    for name, help_text in (
        ("worst-dice", "Minimum worst-image Dice, e.g. int8=0.9"),
        ("mean-dice", "Minimum mean Dice, e.g. 0.99"),
        ("pixel-agreement", "Minimum fraction of mask pixels that agree, e.g. fp32=0.999"),
        ("rel-l2", "Maximum relative L2 error of the logits, e.g. fp16=2e-2"),
    ):
        f = click.option(f"--{name}", "tol_" + name.replace("-", "_"), multiple=True, metavar="[PREC=]VALUE",
                         help=f"{help_text}. Without PREC= it applies to every precision; 'none' disables.")(f)
    return f


def _parse_tolerances(**opts: tuple[str, ...]) -> dict[str, Any]:
    from dataclasses import replace

    from .verify import DEFAULT_TOLERANCES

    tols = dict(DEFAULT_TOLERANCES)
    for key, values in opts.items():
        field = key.removeprefix("tol_")
        for spec in values:
            prec, _, value = spec.rpartition("=")
            targets = [prec] if prec else list(tols)
            for p in targets:
                if p not in tols:
                    raise InputError(f"--{field.replace('_', '-')} {spec}: unknown precision {p!r}")
                try:
                    v = None if value.lower() == "none" else float(value)
                except ValueError as exc:
                    raise InputError(f"--{field.replace('_', '-')} {spec}: not a number") from exc
                tols[p] = replace(tols[p], **{field: v})
    return tols


@main.command()
@bundle_option
@click.option("--backend", "backends", type=click.Choice([b for b in BACKENDS if b != "auto"]), multiple=True,
              default=("all",), show_default=True, help="Backend(s) to verify (repeatable).")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_CHOICES), multiple=True,
              default=("all",), show_default=True, help="Precision(s) to verify (repeatable).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
@_tolerance_options
def verify(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], json_path: str | None,
           **tols: tuple[str, ...]) -> None:
    """Run backends on the golden set and compare with PyTorch FP32 (exit 1 on a miss)."""
    from .errors import VerificationFailed
    from .report import verify_table
    from .verify import summary_counts
    from .verify import verify as run_verify

    tolerances = _parse_tolerances(**tols)
    bundle = _load_bundle(bundle_dir)
    backend_list = ["all"] if "all" in backends else list(backends)
    precision_list = ["all"] if "all" in precisions else list(precisions)
    rows = run_verify(bundle, backend_list, precision_list, tolerances, reporter=_reporter())
    if json_path != "-":
        _stdout().print(verify_table(rows))
    _write_json(json_path, {"bundle": str(bundle.root), "results": rows})
    counts = summary_counts(rows)
    if counts["pass"] + counts["fail"] == 0:
        raise InputError("no requested backend can run here: " + "; ".join(
            f"{r['backend']}/{r['precision']}: {r['reason']}" for r in rows)[:500])
    if counts["fail"]:
        failed = ", ".join(f"{r['backend']}/{r['precision']}" for r in rows if r["status"] == "fail")
        raise VerificationFailed(f"{counts['fail']} backend(s) missed tolerance: {failed}")


# ------------------------------------------------------------------------------------ bench
@main.command()
@bundle_option
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True, default=("auto",),
              show_default=True, help="Backend(s) to time (repeatable, or all); ratios are against the first.")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_CHOICES), multiple=True, default=("fp32",),
              show_default=True, help="Precision(s) to time (repeatable, or all).")
@click.option("--shape", default=None, metavar="NxCxHxW", help="Input shape (default 1xCx256x256).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed warm-up iterations.")
@click.option("--iterations", type=int, default=None, help="Timed iterations (default 30).")
@click.option("--duration", type=float, default=None, help="Time for this many seconds instead.")
@click.option("--end-to-end", is_flag=True, help="Include normalisation, padding and copies.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: all cores).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
def bench(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], shape: str | None, warmup: int,
          iterations: int | None, duration: float | None, end_to_end: bool, threads: int | None,
          json_path: str | None) -> None:
    """Measure latency and throughput with one method for every backend."""
    from .bench import BenchSettings, bench_many, parse_shape
    from .report import bench_table

    if iterations is not None and duration is not None:
        raise InputError("give --iterations or --duration, not both")
    bundle = _load_bundle(bundle_dir)
    shp = parse_shape(shape, bundle.in_channels) if shape else (1, bundle.in_channels, 256, 256)
    settings = BenchSettings(shape=shp, warmup=warmup, iterations=iterations, duration=duration,
                             end_to_end=end_to_end, threads=threads)
    results, skipped = bench_many(bundle, list(backends), list(precisions), settings, reporter=_reporter())
    out = _stdout()
    if json_path != "-":
        if results:
            out.print(bench_table(results, title=f"Latency at {'x'.join(map(str, shp))}"
                                  + (" (end-to-end)" if end_to_end else "")))
        for r in results:
            if r["cov"] > 0.05:
                out.print(f"[yellow]warning:[/yellow] {r['backend']}/{r['precision']} timing unstable "
                          f"(CoV {100 * r['cov']:.1f}% > 5%): close other programs or use --duration")
        from rich.markup import escape

        for s in skipped:
            out.print(f"[dim]skipped {s['backend']}/{s['precision']}: {escape(s['reason'])}[/dim]", highlight=False)
    _write_json(json_path, {"bundle": str(bundle.root), "results": results, "skipped": skipped})
    if not results:
        raise InputError("nothing could be timed: " + "; ".join(f"{s['backend']}/{s['precision']}: {s['reason']}"
                                                                 for s in skipped)[:500])


# ------------------------------------------------------------------------------------ predict
@main.command()
@bundle_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, metavar="OUTDIR", help="Directory for masks and overlays.")
@click.option("--backend", type=click.Choice([b for b in BACKENDS if b != "all"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--no-overlay", is_flag=True, help="Skip the overlay PNGs.")
def predict(bundle_dir: str, inputs: tuple[str, ...], out: str, backend: str, precision: str,
            no_overlay: bool) -> None:
    """Segment images (.npy/.npz, PNG/TIFF, DICOM, NIfTI): masks plus an overlay PNG per image."""
    from rich.markup import escape

    from .predict import predict_files

    bundle = _load_bundle(bundle_dir)
    results = predict_files(bundle, list(inputs), out, backend=backend, precision=precision,
                            overlay=not no_overlay, reporter=_reporter())
    from rich.table import Table

    table = Table(title=f"Masks written to {out}", title_justify="left")
    for col in ("input", "shape", "foreground px", "mask", "backend"):
        table.add_column(col)
    for r in results:
        table.add_row(escape(r["input"]), "x".join(map(str, r["shape"])), str(r["foreground"]), escape(r["mask"]),
                      r["backend"])
    _stdout().print(table)


# ------------------------------------------------------------------------------------ info / doctor
@main.command()
@bundle_option
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the manifest as JSON ('-': stdout).")
def info(bundle_dir: str, json_path: str | None) -> None:
    """What a bundle holds: model, artifacts, engines, TensorRT lint, verification state."""
    from rich.markup import escape
    from rich.table import Table

    bundle = _load_bundle(bundle_dir)
    if json_path:
        _write_json(json_path, bundle.manifest)
        if json_path == "-":
            return
    _print_bundle_summary(bundle)
    from .bundle import ONNX_FILES

    out = _stdout()
    for precision, name in ONNX_FILES.items():
        if name in bundle.artifacts:
            issues = bundle.artifacts[name].get("trt_lint")
            state = "not checked" if issues is None else "ok" if not issues else "; ".join(issues[:3])
            out.print(f"TensorRT lint {precision}: {escape(state)}", highlight=False)
    ver = bundle.manifest.get("verification", {})
    if ver:
        table = Table(title="Last verification", title_justify="left")
        for col in ("backend/precision", "status", "rel L2", "mean Dice", "when"):
            table.add_column(col)
        for key, r in sorted(ver.items()):
            table.add_row(key, r["status"], "-" if r.get("rel_l2") is None else f"{r['rel_l2']:.2e}",
                          "-" if r.get("mean_dice") is None else f"{r['mean_dice']:.4f}", r.get("time", ""))
        _stdout().print(table)
    else:
        _stdout().print("not verified yet: run 'attdeploy verify'")


@main.command()
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the report as JSON ('-': stdout).")
def doctor(json_path: str | None) -> None:
    """Versions and availability of python, numpy, torch, onnx, onnxruntime, TensorRT, CUDA, GPU."""
    from rich.markup import escape
    from rich.table import Table

    from .environment import doctor_report

    probes = doctor_report()
    if json_path:
        _write_json(json_path, [p.as_dict() for p in probes])
        if json_path == "-":
            return
    table = Table(title="attdeploy doctor", title_justify="left")
    for col in ("component", "status", "version", "detail"):
        table.add_column(col, overflow="fold")
    for p in probes:
        detail = p.detail
        if p.name == "cuda" and p.extra.get("gpus"):
            detail += "; " + "; ".join(f"{g['name']} (sm {g['compute_capability']}, {g['memory_mb']} MB)"
                                       for g in p.extra["gpus"])
        table.add_row(p.name, "[green]available[/green]" if p.available else "[yellow]missing[/yellow]",
                      escape(p.version), escape(detail))
    _stdout().print(table)


# ------------------------------------------------------------------------------------ pipeline
@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", default="deploy", show_default=True, metavar="DIR")
@click.option("--calib", default=None, metavar="PATH", help="Calibration images (required for INT8 of a user model).")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled modules.")
@click.option("--force", is_flag=True, help="Write into a non-empty directory that is not a bundle.")
@click.option("--normalize", default=None, metavar="SPEC", help="Input normalisation (see export).")
@click.option("--bench-iterations", type=int, default=20, show_default=True, help="Timed iterations per backend.")
@click.option("--shape", default=None, metavar="NxCxHxW", help="Benchmark shape (default: 1xCx256x256).")
@click.option("--check-rel-l2", type=float, default=1e-5, show_default=True,
              help="Tolerance of the ONNX Runtime vs PyTorch check right after export.")
def pipeline(model: str | None, out: str, calib: str | None, trust_pickle: bool, force: bool,
             normalize: str | None, bench_iterations: int, shape: str | None, check_rel_l2: float) -> None:
    """export -> quantize -> build (if GPU) -> verify all -> bench all -> report."""
    from .pipeline import run_pipeline

    _require_torch("pipeline")
    rc = run_pipeline(model, out, calib=calib, trust_pickle=trust_pickle, force=force, normalize=normalize,
                      bench_iterations=bench_iterations, shape=shape, check_rel_l2=check_rel_l2,
                      reporter=_reporter(), console=_stdout())
    if rc:
        from .errors import VerificationFailed

        raise VerificationFailed("verification failed for at least one backend (see the report)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
