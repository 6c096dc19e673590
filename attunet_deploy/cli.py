"""``attdeploy``: a thin click layer over the library.

Exit 0 ok, 1 verification failed, 2 bad usage or input (one line on stderr), 3 an unexpected
internal error (a bug), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Modules are
imported inside commands so that ``attdeploy verify`` on a device without torch never imports
it, and ``--help`` stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import AttDeployError, InputError, Interrupted

BACKENDS = ("all", "auto", "torch", "ort", "ort-cuda", "ort-trt", "trt", "ov", "triton")
PRECISION_CHOICES = ("all", "fp32", "fp16", "int8")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted()


class _Group(click.Group):
    """Every error is one stderr line with its exit code; tracebacks only with --debug."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        debug = "--debug" in (sys.argv[1:] if args is None else list(args)) or os.environ.get("ATTDEPLOY_DEBUG") == "1"
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            if debug:
                raise
            hint = f" (see '{exc.ctx.command_path} -h')" if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"error: {_one_line_text(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("ATTDEPLOY_DEBUG") == "1"
        try:
            if threading_main():
                signal.signal(signal.SIGTERM, _on_sigterm)  # roll transactions back, then exit 143
        except (ValueError, OSError):
            pass
        with warnings.catch_warnings(record=True) as caught:
            # Library warnings (torch, numpy, nibabel, onnx) are not the user's business unless
            # they debug: errors that matter are raised as one-line errors by our own checks.
            warnings.simplefilter("always" if debug else "ignore")
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
                click.echo("interrupted: nothing was changed by the unfinished step", err=True)
                ctx.exit(130)
            except Interrupted:
                click.echo("terminated: nothing was changed by the unfinished step", err=True)
                ctx.exit(143)
            except MemoryError:
                click.echo("error: out of memory: use smaller images or batches", err=True)
                ctx.exit(2)
            except Exception as exc:
                # A signal that lands inside a C extension's import surfaces as "ImportError:
                # initialization failed" wrapping the interruption: it is still an interruption.
                cause = _interruption_in(exc)
                if cause is not None and not debug:
                    interrupted = isinstance(cause, KeyboardInterrupt)
                    click.echo(f"{'interrupted' if interrupted else 'terminated'}: nothing was changed by the "
                               "unfinished step", err=True)
                    ctx.exit(130 if interrupted else 143)
                if debug:
                    raise
                click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                           "(rerun with --debug for the traceback)", err=True)
                ctx.exit(3)
            finally:
                if debug:
                    for w in caught:
                        click.echo(f"warning: {w.category.__name__}: {_one_line_text(str(w.message))}", err=True)


def _interruption_in(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or Interrupted in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line_text(text: str) -> str:
    text = " ".join(text.split())
    return text[:600]


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


def _check_json_path(path: str | None, bundle_dir: str | None = None) -> None:
    """Validate --json PATH before any work: a writable file path outside every bundle."""
    if path is None or path == "-":
        return
    from .outputs import check_output

    check_output(path, "--json", kind="file", bundles=[bundle_dir])


def _write_json(path: str | None, data: Any) -> None:
    if path is None:
        return
    from .fileio import dumps, write_json_atomic

    if path == "-":
        click.echo(dumps(data))
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
def _image_options(f: Any, judged_only: bool = False) -> Any:
    f = click.option("--labels", default=None, metavar="PATH",
                     help="Ground-truth masks matched to --images by relative path without extension "
                          "(a/b/slice_012.dcm <-> a/b/slice_012.png): npy/PNG/TIFF/NIfTI, binary or class index.")(f)
    if judged_only:
        return click.option("--images", default=None, metavar="PATH",
                            help="Judge on these images (file or folder; npy/PNG/TIFF/DICOM/NIfTI) instead of the "
                                 "bundle's golden set; nothing is recorded in the bundle.")(f)
    f = click.option("--images", default=None, metavar="PATH",
                     help="Your images (file or folder; npy/PNG/TIFF/DICOM/NIfTI): a deterministic quarter (1..32 "
                          "files) becomes the golden set every backend is judged on; the rest calibrates INT8.")(f)
    return f


def _verify_image_options(f: Any) -> Any:
    return _image_options(f, judged_only=True)


def _finite(name: str, value: float | None, lo: float = 0.0) -> None:
    import math

    if value is not None and (not math.isfinite(value) or value < lo):
        raise InputError(f"{name} {value}: must be a finite number >= {lo:g}")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", default="deploy", show_default=True, metavar="DIR", help="Bundle directory.")
@_image_options
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled modules (runs their code).")
@click.option("--force", is_flag=True, help="Add the bundle to a non-empty folder that is not a bundle (overwrites "
              "nothing).")
@click.option("--normalize", default=None, metavar="SPEC",
              help="Input normalisation: none | ct-window:L,W | mean-std:M,S | scale:D | minmax "
                   "(demo: ct-window:40,400).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--check-rel-l2", type=float, default=1e-5, show_default=True,
              help="Tolerance of the ONNX Runtime vs PyTorch check run after export (exit 1 above it, nothing "
                   "written).")
def export(model: str | None, out: str, images: str | None, labels: str | None, opset: int, trust_pickle: bool,
           force: bool, normalize: str | None, exporter: str, check_rel_l2: float) -> None:
    """Export MODEL (default: the bundled demo) to a bundle: weights, ONNX, golden set, manifest."""
    from .export.onnx import check_export_options, export_bundle
    from .report import verify_table

    check_export_options(opset, check_rel_l2)
    _require_torch("export")
    bundle, row = export_bundle(model, out, opset=opset, trust_pickle=trust_pickle, force=force,
                                normalize=normalize, exporter=exporter, check_rel_l2=check_rel_l2,
                                images=images, labels=labels, reporter=_reporter())
    _print_bundle_summary(bundle)
    _stdout().print(verify_table([row], title=f"ONNX Runtime CPU vs PyTorch FP32 (export check, rel L2 <= "
                                              f"{check_rel_l2:g})"))


def _require_extra(command: str, modules: tuple[str, ...], extra: str) -> None:
    from .environment import has_module

    missing = [m for m in modules if not has_module(m)]
    if missing:
        raise InputError(f"'{command}' needs {', '.join(missing)}: pip install 'attunet-deploy[{extra}]'")


def _require_torch(command: str) -> None:
    from .environment import has_module

    if not has_module("torch"):
        raise InputError(f"'{command}' needs torch: pip install 'attunet-deploy[torch]' "
                         "(devices without torch can verify, bench and predict existing bundles)")


def _print_bundle_summary(bundle: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .golden import describe
    from .preprocess import describe_normalization

    m = bundle.manifest
    cfg = m["model"]["config"]
    table = Table(title=f"Bundle {escape(str(bundle.root))}", title_justify="left", show_header=True)
    table.add_column("artifact")
    table.add_column("precision")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    table.add_column("made by")
    for name, entry in sorted(bundle.artifacts.items()):
        prod = entry.get("producer", {})
        made = ", ".join(f"{k} {prod[k]}" for k in ("torch", "onnxruntime", "tensorrt", "exporter", "opset")
                         if k in prod)
        present = "" if os.path.lexists(bundle.path(name)) else " [red](missing)[/red]"
        table.add_row(escape(name) + present, entry.get("precision", "-"), _size(entry.get("bytes", 0)),
                      entry.get("sha256", "")[:12], escape(made))
    out = _stdout()
    src = m["model"]["source"]
    params = src.get("parameters", "?")
    out.print(escape(f"AttentionUNet in={cfg['in_channels']} out={cfg['out_channels']} base={cfg['base_channels']}"
                     f" · {params:,} parameters · from {src.get('layout')} " if isinstance(params, int) else
                     f"AttentionUNet in={cfg['in_channels']} out={cfg['out_channels']} base={cfg['base_channels']} · ")
              + escape(f"{Path(str(src.get('path', ''))).name} · normalisation: "
                       f"{describe_normalization(m['preprocessing'])} · post: {m['postprocessing']['kind']}"),
              highlight=False)
    out.print(escape(describe(m.get("golden") or {})), highlight=False)
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
              help="Calibration images: a directory or file (.npy/.npz, PNG/TIFF, DICOM, NIfTI); held-out golden "
                   "images are excluded by content. Default: the --images export held out from, or demo phantoms.")
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
@click.option("--no-verify", is_flag=True, help="Write the graphs without checking them on ONNX Runtime first.")
@click.option("--max-dice-drop", type=float, default=None, metavar="X",
              help="Accuracy-aware INT8: while the held-out golden images' mean Dice vs FP32 is below 1 - X, return "
                   "the most sensitive convolutions to float, one at a time.")
def quantize(bundle_dir: str, calib: str | None, method: str, max_samples: int, quantize_all: bool,
             precisions: tuple[str, ...], full_range_weights: bool, keep_fp32: tuple[str, ...],
             no_verify: bool, max_dice_drop: float | None) -> None:
    """Write model.fp16.onnx and model.int8.onnx (Q/DQ), verified on ONNX Runtime CPU, in one commit."""
    from .export.quantize import check_quantize_options, quantize_bundle
    from .report import verify_table
    from .verify import check_dice_drop

    check_quantize_options(method, max_samples, list(precisions) or ["fp16", "int8"])
    check_dice_drop(max_dice_drop)
    bundle = _load_bundle(bundle_dir)
    rows = quantize_bundle(bundle, calib=calib, method=method, max_samples=max_samples,
                           quantize_all=quantize_all, precisions=list(precisions) or ["fp16", "int8"],
                           full_range_weights=full_range_weights, fp16_keep_fp32=list(keep_fp32),
                           verify=not no_verify, reporter=_reporter(), max_dice_drop=max_dice_drop)
    if rows:
        _stdout().print(verify_table(rows, title="Quantised graphs on ONNX Runtime CPU vs PyTorch FP32"))
    _print_accuracy_aware(_load_bundle(bundle_dir))


def _print_accuracy_aware(bundle: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    aa = bundle.artifacts.get("model.int8.onnx", {}).get("producer", {}).get("accuracy_aware")
    if not aa:
        return
    table = Table(title=f"Accuracy-aware INT8 (target mean Dice vs FP32 >= {aa['target_mean_dice']:.4f})",
                  title_justify="left")
    for col in ("step", "returned to float", "mean Dice", "latency ms (ORT CPU)"):
        table.add_column(col)
    for i, st in enumerate(aa["steps"]):
        table.add_row(str(i), escape(", ".join(st["float_added"]) or "-"), f"{st['mean_dice']:.4f}",
                      f"{st['latency_ms']:.1f}")
    _stdout().print(table)


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

    if workspace_mb is not None and not 1 <= workspace_mb <= 1 << 20:
        raise InputError("--workspace-mb must be an integer in 1..1048576")
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
                tols[p] = replace(tols[p], **{field: v})  # Tolerance checks finite and in range
    return tols


def _triton_options(f: Any) -> Any:
    f = click.option("--triton-timeout", type=float, default=None, metavar="SECONDS",
                     help="Bound on each Triton request (default 8; connecting and health checks: at most 5).")(f)
    f = click.option("--triton-model", default=None, metavar="NAME",
                     help="Served model for --backend triton (default attunet_<precision>).")(f)
    f = click.option("--triton-url", default=None, metavar="HOST:PORT",
                     help="Triton server for --backend triton (http://host:8000 or grpc://host:8001; "
                          "default $ATTDEPLOY_TRITON_URL).")(f)
    return f


def _runner_options(triton_url: str | None, triton_model: str | None,
                    triton_timeout: float | None = None) -> dict[str, Any]:
    """Runner options of the --triton-* flags, validated before any work."""
    opts: dict[str, Any] = {}
    if triton_timeout is not None:
        from .runtimes.triton import check_timeout

        opts["triton_timeout"] = check_timeout(triton_timeout)
    if triton_url is not None:
        from .runtimes.triton import parse_url

        parse_url(triton_url)
        opts["triton_url"] = triton_url
    if triton_model is not None:
        opts["triton_model"] = triton_model
    return opts


@main.command()
@bundle_option
@click.option("--backend", "backends", type=click.Choice([b for b in BACKENDS if b != "auto"]), multiple=True,
              default=("all",), show_default=True, help="Backend(s) to verify (repeatable).")
@click.option("--precision", "precisions", type=click.Choice(PRECISION_CHOICES), multiple=True,
              default=("all",), show_default=True, help="Precision(s) to verify (repeatable).")
@_verify_image_options
@click.option("--max-dice-drop", type=float, default=None, metavar="X",
              help="Fail a row whose Dice against the ground truth is more than X below the reference's.")
@click.option("--save-diff", default=None, metavar="DIR",
              help="Write a PNG per worst image of each row: agreement, reference-only and backend-only pixels.")
@_triton_options
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
@_tolerance_options
def verify(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], images: str | None,
           labels: str | None, max_dice_drop: float | None, save_diff: str | None, triton_url: str | None,
           triton_model: str | None, triton_timeout: float | None, json_path: str | None,
           **tols: tuple[str, ...]) -> None:
    """Judge backends against the reference: the bundle's golden set, or --images (exit 1 on a miss).

    Passing runs on the golden set are recorded in the manifest; --images runs change nothing.
    """
    from .errors import VerificationFailed
    from .report import verify_table
    from .verify import check_dice_drop, summary_counts, verify_images
    from .verify import verify as run_verify

    tolerances = _parse_tolerances(**tols)
    check_dice_drop(max_dice_drop)
    _check_json_path(json_path, bundle_dir)
    if labels is not None and images is None:
        raise InputError("--labels needs --images (the images the labels belong to)")
    if save_diff is not None:
        from .outputs import check_output

        check_output(save_diff, "--save-diff", kind="dir", empty=True, bundles=[bundle_dir])
    bundle = _load_bundle(bundle_dir)
    backend_list = ["all"] if "all" in backends else list(backends)
    precision_list = ["all"] if "all" in precisions else list(precisions)
    opts = _runner_options(triton_url, triton_model, triton_timeout)
    if images is not None:
        rows = verify_images(bundle, images, labels, backend_list, precision_list, tolerances, reporter=_reporter(),
                             max_dice_drop=max_dice_drop, save_diff=save_diff, **opts)
    else:
        rows = run_verify(bundle, backend_list, precision_list, tolerances, reporter=_reporter(),
                          max_dice_drop=max_dice_drop, save_diff=save_diff, **opts)
    if json_path != "-":
        ref = rows[0]["reference"] if rows else "reference"
        _stdout().print(verify_table(rows, title=f"Verification against {ref}"))
        if save_diff is not None:
            from .diffimages import LEGEND

            _stdout().print(f"Mask differences in {save_diff} ({LEGEND})", highlight=False)
    _write_json(json_path, {"bundle": str(bundle.root), "images": images, "results": rows})
    counts = summary_counts(rows)
    if counts["pass"] + counts["fail"] == 0:
        raise InputError("no requested backend can run here: " + "; ".join(
            f"{r['backend']}/{r['precision']}: {r['reason']}" for r in rows)[:500])
    if counts["fail"]:
        failed = ", ".join(f"{r['backend']}/{r['precision']}" for r in rows if r["status"] == "fail")
        raise VerificationFailed(f"{counts['fail']} backend(s) missed tolerance: {failed} (bundle not changed)")
    if images is None:
        _record_verification(bundle, rows)


def _record_verification(bundle: Any, rows: list[dict[str, Any]]) -> None:
    """Record a passing run in the manifest; a busy or read-only bundle is only a notice."""
    from .errors import BundleError

    try:
        with bundle.transaction() as txn:
            txn.record_verification(rows)
            txn.commit()
    except BundleError as exc:
        _reporter().notice("not recorded in the manifest:", str(exc))


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
@click.option("--threads", type=int, default=None, help="CPU threads for torch, ONNX Runtime and OpenVINO "
              "(default: all cores).")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Requests in flight at once (served models: throughput under load).")
@_triton_options
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write results as JSON ('-': stdout).")
def bench(bundle_dir: str, backends: tuple[str, ...], precisions: tuple[str, ...], shape: str | None, warmup: int,
          iterations: int | None, duration: float | None, end_to_end: bool, threads: int | None, concurrency: int,
          triton_url: str | None, triton_model: str | None, triton_timeout: float | None,
          json_path: str | None) -> None:
    """Measure latency and throughput with one method for every backend."""
    from .bench import BenchSettings, bench_many, parse_shape
    from .report import bench_table

    if iterations is not None and duration is not None:
        raise InputError("give --iterations or --duration, not both")
    BenchSettings(shape=(1, 1, 16, 16), warmup=warmup, iterations=iterations, duration=duration,
                  threads=threads, concurrency=concurrency)  # validates every option before any work
    _check_json_path(json_path, bundle_dir)
    bundle = _load_bundle(bundle_dir)
    shp = parse_shape(shape, bundle.in_channels) if shape else (1, bundle.in_channels, 256, 256)
    settings = BenchSettings(shape=shp, warmup=warmup, iterations=iterations, duration=duration,
                             end_to_end=end_to_end, threads=threads, concurrency=concurrency)
    results, skipped = bench_many(bundle, list(backends), list(precisions), settings, reporter=_reporter(),
                                  **_runner_options(triton_url, triton_model, triton_timeout))
    out = _stdout()
    if json_path != "-":
        if results:
            m = results[0].get("machine", {})
            out.print(bench_table(results, title=f"Latency at {'x'.join(map(str, shp))}"
                                  + (" (end-to-end)" if end_to_end else "")
                                  + (f", concurrency {concurrency}" if concurrency > 1 else "")
                                  + f" · {m.get('cpu_model', '?')} ({m.get('cores', '?')} cores; "
                                  + f"{' '.join(m.get('isa', [])) or 'no AVX2'})"))
        for r in results:
            if r["cov"] > 0.05:
                out.print(f"[yellow]warning:[/yellow] {r['backend']}/{r['precision']} timing unstable "
                          f"(CoV {100 * r['cov']:.1f}% > 5%): close other programs or use --duration")
        from rich.markup import escape

        for sk in skipped:
            out.print(f"[dim]skipped {sk['backend']}/{sk['precision']}: {escape(sk['reason'])}[/dim]",
                      highlight=False)
    _write_json(json_path, {"bundle": str(bundle.root), "results": results, "skipped": skipped})
    if not results:
        raise InputError("nothing could be timed: " + "; ".join(f"{sk['backend']}/{sk['precision']}: {sk['reason']}"
                                                                 for sk in skipped)[:500])


# ------------------------------------------------------------------------------------ predict
@main.command()
@bundle_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, metavar="OUTDIR", help="Directory for masks and overlays.")
@click.option("--backend", type=click.Choice([b for b in BACKENDS if b != "all"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--no-overlay", is_flag=True, help="Skip the overlay PNGs.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist already (refused otherwise).")
@click.option("--dicom-seg", is_flag=True, help="INPUTS are CT series: write one DICOM Segmentation per series.")
@click.option("--segment-label", default="Target", show_default=True, help="DICOM SEG segment label.")
@_triton_options
def predict(bundle_dir: str, inputs: tuple[str, ...], out: str, backend: str, precision: str,
            no_overlay: bool, overwrite: bool, dicom_seg: bool, segment_label: str, triton_url: str | None,
            triton_model: str | None, triton_timeout: float | None) -> None:
    """Segment images (.npy/.npz, PNG/TIFF, DICOM, NIfTI): masks plus an overlay PNG per image,
    or with --dicom-seg one DICOM SEG per CT series."""
    from rich.markup import escape
    from rich.table import Table

    from .outputs import check_output

    check_output(out, "-o", kind="dir", bundles=[bundle_dir])
    bundle = _load_bundle(bundle_dir)
    opts = _runner_options(triton_url, triton_model, triton_timeout)
    if dicom_seg:
        _require_extra("predict --dicom-seg", ("pydicom", "highdicom"), "dicom")
        from .dicom.files import predict_series_folder

        rows = predict_series_folder(bundle, list(inputs), out, backend=backend, precision=precision,
                                     overwrite=overwrite, segment_label=segment_label, reporter=_reporter(), **opts)
        table = Table(title=f"DICOM SEG written to {escape(out)}", title_justify="left")
        for col in ("series", "slices", "frames with mask", "SEG", "backend"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(escape(r["series"]), str(r["slices"]), str(r["frames"]), escape(r["seg"]), r["backend"])
        _stdout().print(table)
        return
    from .predict import predict_files

    results = predict_files(bundle, list(inputs), out, backend=backend, precision=precision,
                            overlay=not no_overlay, overwrite=overwrite, reporter=_reporter(), **opts)
    table = Table(title=f"Masks written to {escape(out)}", title_justify="left")
    for col in ("input", "shape", "foreground px", "mask", "backend"):
        table.add_column(col)
    for r in results:
        table.add_row(escape(r["input"]), "x".join(map(str, r["shape"])), str(r["foreground"]), escape(r["mask"]),
                      r["backend"])
    _stdout().print(table)


# ------------------------------------------------------------------------------------ serve-dicom
@main.command("serve-dicom")
@bundle_option
@click.option("--out", required=True, metavar="OUT", help="Folder for received instances, SEGs and the queue.")
@click.option("--port", type=int, default=11112, show_default=True, help="TCP port to listen on.")
@click.option("--ae-title", default="ATTDEPLOY", show_default=True, help="This node's AE title.")
@click.option("--bind", default="0.0.0.0", show_default=True, metavar="ADDR",
              help="Address to listen on. The default, all interfaces, is what scanners expect of a DICOM node; "
                   "use 127.0.0.1 to accept local connections only.")
@click.option("--allow-ae", multiple=True, metavar="AET", help="Accept associations only from these calling AE "
              "titles (repeatable; compared as DICOM does: case-sensitive, surrounding spaces ignored; default: any).")
@click.option("--any-called-ae", is_flag=True, help="Accept associations whatever called AE title they name "
              "(default: it must equal --ae-title).")
@click.option("--allow-host", multiple=True, metavar="ADDR[/BITS]", help="Accept connections only from these "
              "addresses or networks (repeatable; default: any).")
@click.option("--tls-cert", default=None, metavar="PEM", help="DICOM TLS (PS3.15 Annex B): this node's certificate.")
@click.option("--tls-key", default=None, metavar="PEM", help="DICOM TLS: the certificate's private key.")
@click.option("--tls-ca", default=None, metavar="PEM", help="DICOM TLS: require client certificates signed by "
              "this CA.")
@click.option("--quiet-seconds", type=float, default=5.0, show_default=True,
              help="A series is complete when none of its instances arrived for this long.")
@click.option("--forward", default=None, metavar="AET@HOST:PORT", help="Send each SEG on by C-STORE (retried with "
              "back-off; kept queued on disk until it is accepted).")
@click.option("--max-instance-mb", type=float, default=64.0, show_default=True,
              help="Larger instances are refused with 0xA700 (out of resources).")
@click.option("--min-free-mb", type=float, default=1024.0, show_default=True,
              help="Below this much free disk under --out, stores are refused with 0xA700.")
@click.option("--keep-archive", default="7", show_default=True, metavar="DAYS|none",
              help="How long archive/ (segmented instances) and sent/ keep their files; none: delete a series' "
                   "instances once its SEG is written.")
@click.option("--max-associations", type=int, default=32, show_default=True,
              help="Concurrent associations; more are rejected (transient) until one ends.")
@click.option("--acse-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a connection may take to request an association (also the TLS handshake); "
                   "silent sockets are dropped after it.")
@click.option("--dimse-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for a DIMSE message within an association.")
@click.option("--network-timeout", type=float, default=60.0, show_default=True,
              help="Seconds an idle association is kept open.")
@click.option("--http-port", type=int, default=None, metavar="PORT",
              help="Serve /healthz and Prometheus /metrics on this port (bound like --bind).")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option("--backend", type=click.Choice([b for b in BACKENDS if b not in ("all",)]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True)
@click.option("--segment-label", default="Target", show_default=True, help="DICOM SEG segment label.")
def serve_dicom(bundle_dir: str, out: str, port: int, ae_title: str, bind: str, allow_ae: tuple[str, ...],
                any_called_ae: bool, allow_host: tuple[str, ...], tls_cert: str | None, tls_key: str | None,
                tls_ca: str | None, quiet_seconds: float, forward: str | None, max_instance_mb: float,
                min_free_mb: float, keep_archive: str, max_associations: int, acse_timeout: float,
                dimse_timeout: float, network_timeout: float, http_port: int | None, log_json: bool, backend: str,
                precision: str, segment_label: str) -> None:
    """A DICOM node beside the scanner: CT series in by C-STORE, a DICOM SEG out per series.

    Each instance is checked (UIDs, pixel data, size) and on disk before Success is returned; a
    non-CT or unusable instance gets a failure status. Stop with SIGTERM (or Ctrl-C): unfinished
    work is picked up on the next start.
    """
    _require_extra("serve-dicom", ("pydicom", "pynetdicom", "highdicom"), "dicom")
    from .dicom.node import DicomNode, NodeLimits, parse_keep

    limits = NodeLimits(max_instance_mb=max_instance_mb, min_free_mb=min_free_mb,
                        keep_archive_days=parse_keep(keep_archive), max_associations=max_associations,
                        acse_timeout=acse_timeout, dimse_timeout=dimse_timeout, network_timeout=network_timeout)
    node = DicomNode(_load_bundle(bundle_dir), out, port=port, ae_title=ae_title, bind=bind, allow_ae=list(allow_ae),
                     quiet_seconds=quiet_seconds, forward=forward, log_json=log_json, backend=backend,
                     precision=precision, segment_label=segment_label, limits=limits, any_called_ae=any_called_ae,
                     allow_host=list(allow_host), tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                     http_port=http_port)
    node.serve()


# ------------------------------------------------------------------------------------ triton
@main.command()
@bundle_option
@click.option("-o", "--output", "out", required=True, metavar="REPO", help="Model repository folder to write.")
@click.option("--precision", "precisions", type=click.Choice(["fp32", "fp16", "int8"]), multiple=True,
              help="Graphs to serve (repeatable; default every graph the bundle has).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="max_batch_size of the served models.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Where the ONNX models run; with cpu the ensemble uses attunet_cpu.")
@click.option("--tensorrt-accelerator", is_flag=True,
              help="Let ONNX Runtime in Triton build TensorRT engines (strongly typed, precision from the graph).")
def triton(bundle_dir: str, out: str, precisions: tuple[str, ...], max_batch: int, instances: int, kind: str,
           tensorrt_accelerator: bool) -> None:
    """Write a Triton Inference Server model repository: ONNX models, TensorRT plans built here,
    pre/post-processing and an ensemble raw image -> mask. Every config is checked with Triton's schema."""
    from rich.markup import escape
    from rich.table import Table

    _require_extra("triton", ("tritonclient", "google.protobuf"), "triton")
    from .bundle import ONNX_FILES
    from .export.triton import write_repository

    bundle = _load_bundle(bundle_dir)
    chosen = list(precisions) or [p for p, f in ONNX_FILES.items() if f in bundle.artifacts]
    models = write_repository(bundle, out, chosen, max_batch=max_batch, instances=instances, kind=kind,
                              tensorrt_accelerator=tensorrt_accelerator, reporter=_reporter())
    table = Table(title=f"Triton model repository {escape(out)}", title_justify="left")
    table.add_column("model")
    table.add_column("serves")
    for m in models:
        what = {"attunet_segment": "raw image -> uint8 mask (ensemble)", "attunet_pre": "normalise + pad (python)",
                "attunet_post": "crop + mask (python)", "attunet_cpu": "model.onnx on ONNX Runtime (python backend)"}
        table.add_row(m, what.get(m, "TensorRT plan" if m.startswith("attunet_trt_") else "ONNX (onnxruntime backend)"))
    _stdout().print(table)
    _stdout().print(f"serve it: see {escape(str(Path(out) / 'README.md'))}", highlight=False)


# ------------------------------------------------------------------------------------ info / doctor
@main.command()
@bundle_option
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the manifest as JSON ('-': stdout).")
def info(bundle_dir: str, json_path: str | None) -> None:
    """What a bundle holds: model, artifacts, engines, TensorRT lint, verification state."""
    from rich.markup import escape
    from rich.table import Table

    _check_json_path(json_path, bundle_dir)
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
            state = "not checked" if issues is None else "ok" if not issues else "; ".join(map(str, issues[:3]))
            out.print(f"TensorRT lint {precision}: {escape(state)}", highlight=False)
    int8 = bundle.artifacts.get(ONNX_FILES["int8"], {}).get("producer", {})
    if int8.get("calibration"):
        files = int8.get("calibration_files") or []
        out.print(escape(f"INT8 calibration: {int8['calibration']}" + (f"; files: {', '.join(map(str, files[:5]))}"
                                                                        + (" ..." if len(files) > 5 else "")
                                                                        if files else "")), highlight=False)
    ver = bundle.manifest.get("verification", {})
    if ver:
        table = Table(title="Last recorded verification (passing runs)", title_justify="left")
        for col in ("backend/precision", "status", "rel L2", "mean Dice", "Dice vs truth", "when"):
            table.add_column(col)

        def num(r: dict[str, Any], key: str, fmt: str) -> str:
            v = r.get(key)
            return "-" if not isinstance(v, (int, float)) else format(v, fmt)

        for key, r in sorted(ver.items()):
            table.add_row(escape(str(key)), escape(str(r.get("status", "?"))), num(r, "rel_l2", ".2e"),
                          num(r, "mean_dice", ".4f"), num(r, "gt_dice", ".4f"), escape(str(r.get("time", ""))))
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
@click.option("--calib", default=None, metavar="PATH",
              help="Your images: calibration set for INT8 (required for a user model's INT8) and, unless --images "
                   "is given, also the images a held-out quarter of is judged on.")
@_image_options
@click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled modules.")
@click.option("--force", is_flag=True, help="Add the bundle to a non-empty folder that is not a bundle.")
@click.option("--normalize", default=None, metavar="SPEC", help="Input normalisation (see export).")
@click.option("--bench-iterations", type=int, default=20, show_default=True, help="Timed iterations per backend.")
@click.option("--shape", default=None, metavar="NxCxHxW", help="Benchmark shape (default: 1xCx256x256).")
@click.option("--check-rel-l2", type=float, default=1e-5, show_default=True,
              help="Tolerance of the ONNX Runtime vs PyTorch check right after export.")
def pipeline(model: str | None, out: str, calib: str | None, images: str | None, labels: str | None,
             trust_pickle: bool, force: bool, normalize: str | None, bench_iterations: int, shape: str | None,
             check_rel_l2: float) -> None:
    """export -> quantize -> build (if GPU) -> verify all -> bench all -> report."""
    from .bench import BenchSettings, parse_shape
    from .export.onnx import check_export_options
    from .pipeline import run_pipeline
    from .preprocess import parse_normalization

    check_export_options(18, check_rel_l2)
    BenchSettings(shape=(1, 1, 16, 16), iterations=bench_iterations)
    if shape:
        parse_shape(shape)
    parse_normalization(normalize)
    _require_torch("pipeline")
    rc = run_pipeline(model, out, calib=calib, images=images, labels=labels, trust_pickle=trust_pickle, force=force,
                      normalize=normalize, bench_iterations=bench_iterations, shape=shape,
                      check_rel_l2=check_rel_l2, reporter=_reporter(), console=_stdout())
    if rc:
        from .errors import VerificationFailed

        raise VerificationFailed("verification failed for at least one backend (see the report)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
