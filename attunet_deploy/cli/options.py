"""Option groups and validators shared by several commands, and the small helpers every command
uses (load the bundle, make a reporter, write JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from attunet_deploy.bundle import PRECISIONS
from attunet_deploy.errors import InputError
from attunet_deploy.judge.results import Tolerance
from attunet_deploy.runtimes import registry

#: --backend choices: every registered backend, plus "all" and "auto" where a command takes them.
BACKENDS = ("all", "auto", *registry.BACKENDS)
PRECISION_CHOICES = ("all", *PRECISIONS)


def backend_choice(*, all_: bool, auto: bool) -> click.Choice:
    return click.Choice([b for b in BACKENDS if (all_ or b != "all") and (auto or b != "auto")])


def validated(check: Callable[[Any], object]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running a library validator on the option's value (None: not given)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            check(value)
        return value

    return callback


def _check_shape(text: str) -> None:
    from attunet_deploy.preprocess import parse_shape

    parse_shape(text)


def export_options(f: Any) -> Any:
    """What ``export`` and ``pipeline`` share: MODEL, the bundle folder, the user's images and labels,
    trust, normalisation and the tolerance of the check run right after export."""
    decorators = [
        click.argument("model", required=False, type=click.Path(dir_okay=False)),
        click.option("-o", "--output", "out", default="deploy", show_default=True, metavar="DIR",
                     help="Bundle directory."),
        image_options,
        click.option("--trust-pickle", is_flag=True, help="Allow checkpoints holding pickled modules (runs their "
                     "code)."),
        click.option("--force", is_flag=True, help="Add the bundle to a non-empty folder that is not a bundle "
                     "(overwrites nothing)."),
        click.option("--normalize", default=None, metavar="SPEC",
                     help="Input normalisation: none | ct-window:L,W | mean-std:M,S | scale:D | minmax "
                          "(demo: ct-window:40,400)."),
        click.option("--check-rel-l2", type=float, default=1e-5, show_default=True,
                     help="Tolerance of the ONNX Runtime vs PyTorch check run after export (exit 1 above it, "
                          "nothing written)."),
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


def export_settings(model: str | None, out: str, *, roi: str | None = None, spacing: str | None = None,
                    segments: tuple[str, ...] = (), **fields: Any) -> Any:
    """ExportSettings of the export options (checked by its constructor before any work)."""
    from attunet_deploy.steps.export import ExportSettings  # torch is imported only when export runs
    from attunet_deploy.steps.model_space import parse_triple

    return ExportSettings(model=model, out=out, roi=parse_triple(roi, "--roi") if roi else None,
                          spacing=parse_triple(spacing, "--spacing", float) if spacing else None,
                          segments=tuple(segments), **fields)


def shape_option(f: Any, help_text: str = "Input shape (default 1xCx256x256).") -> Any:
    return click.option("--shape", default=None, metavar="NxCxHxW", callback=validated(_check_shape),
                        help=help_text)(f)


def reporter(quiet: bool = False) -> Any:
    from attunet_deploy.console import RichReporter

    return RichReporter(quiet=quiet)


def check_json_path(path: str | None, bundle_dir: str | None = None) -> None:
    """Validate --json PATH before any work: a writable file path outside every bundle."""
    if path is None or path == "-":
        return
    from attunet_deploy.outputs import check_output

    check_output(path, "--json", kind="file", bundles=[bundle_dir])


def write_json(path: str | None, data: Any) -> None:
    if path is None:
        return
    from attunet_deploy.fileio import dumps, write_json_atomic

    if path == "-":
        click.echo(dumps(data))
    else:
        write_json_atomic(path, data)


def load_bundle(path: str) -> Any:
    from attunet_deploy.bundle import Bundle

    return Bundle.load(path)


bundle_option = click.option("-b", "--bundle", "bundle_dir", default="deploy", show_default=True,
                             metavar="DIR", help="Bundle directory written by 'attdeploy export'.")


# ------------------------------------------------------------------------------------ export
def image_options(f: Any, judged_only: bool = False) -> Any:
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


def verify_image_options(f: Any) -> Any:
    return image_options(f, judged_only=True)


def require_extra(command: str, modules: tuple[str, ...], extra: str) -> None:
    from attunet_deploy.environment import has_module

    missing = [m for m in modules if not has_module(m)]
    if missing:
        raise InputError(f"'{command}' needs {', '.join(missing)}: pip install 'attunet-deploy[{extra}]'")


def require_torch(command: str) -> None:
    from attunet_deploy.environment import has_module

    if not has_module("torch"):
        raise InputError(f"'{command}' needs torch: pip install 'attunet-deploy[torch]' "
                         "(devices without torch can verify, bench and predict existing bundles)")


# ------------------------------------------------------------------------------------ verify
def tolerance_options(f: Any) -> Any:
    for name, help_text in (
        ("worst-dice", "Minimum worst-image Dice, e.g. int8=0.9"),
        ("mean-dice", "Minimum mean Dice, e.g. 0.99"),
        ("pixel-agreement", "Minimum fraction of mask pixels that agree, e.g. fp32=0.999"),
        ("rel-l2", "Maximum relative L2 error of the logits, e.g. fp16=2e-2"),
    ):
        f = click.option(f"--{name}", "tol_" + name.replace("-", "_"), multiple=True, metavar="[PREC=]VALUE",
                         help=f"{help_text}. Without PREC= it applies to every precision; 'none' disables.")(f)
    return f


def parse_tolerances(**opts: tuple[str, ...]) -> dict[str, Tolerance]:
    from dataclasses import replace

    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES

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


def triton_options(f: Any) -> Any:
    f = click.option("--triton-timeout", type=float, default=None, metavar="SECONDS",
                     help="Bound on each Triton request (default 8; connecting and health checks: at most 5).")(f)
    f = click.option("--triton-model", default=None, metavar="NAME",
                     help="Served model for --backend triton (default attunet_<precision>).")(f)
    f = click.option("--triton-url", default=None, metavar="HOST:PORT",
                     help="Triton server for --backend triton (http://host:8000 or grpc://host:8001; "
                          "default $ATTDEPLOY_TRITON_URL).")(f)
    return f


def runner_options(triton_url: str | None, triton_model: str | None,
                    triton_timeout: float | None = None) -> dict[str, str | float]:
    """Runner options of the --triton-* flags, validated before any work."""
    opts: dict[str, str | float] = {}
    if triton_timeout is not None:
        from attunet_deploy.runtimes.triton import check_timeout

        opts["triton_timeout"] = check_timeout(triton_timeout)
    if triton_url is not None:
        from attunet_deploy.runtimes.triton import parse_url

        parse_url(triton_url)
        opts["triton_url"] = triton_url
    if triton_model is not None:
        opts["triton_model"] = triton_model
    return opts


def report_option(fn: Any) -> Any:
    return click.option("--report", "report_dir", default=None, metavar="DIR",
                        help="Also write report.html (verdict, mask panels, Dice and latency charts, the machine), "
                             "report.md and report.json into DIR (new or empty).")(fn)


def check_report_dir(report_dir: str | None, bundle_dir: str, save_diff: str | None = None,
                     json_path: str | None = None) -> None:
    """--report DIR is checked before any work: new or empty, outside the bundle, not --save-diff's,
    and not where --json would write one of the report's own files (one would silently replace the
    other)."""
    if report_dir is None:
        return
    from attunet_deploy.outputs import check_output

    target = check_output(report_dir, "--report", kind="dir", empty=True, bundles=[bundle_dir])
    if json_path not in (None, "-") and Path(json_path).resolve().parent == target \
            and Path(json_path).name in ("report.json", "report.md", "report.html"):
        raise InputError(f"--json {json_path} is the report's own {Path(json_path).name} in --report {report_dir}: "
                         "write the JSON elsewhere (the report folder has report.json already)")
    if save_diff is not None and target == Path(save_diff).resolve():  # --save-diff itself was checked already
        raise InputError("--report and --save-diff need different folders (both write a report.md)")


#: --precision for commands that run a bundle: a precision, or the fastest that passes here.
RUN_PRECISIONS = (*PRECISIONS, "best")


def resolve_precision(bundle: Any, backend: str, precision: str, **options: Any) -> tuple[str, str]:
    """(backend, precision) to run: ``best`` becomes the fastest that passes verification here
    (``loader.resolve``, the same as ``load_runner``), said in one notice."""
    from attunet_deploy.loader import resolve

    backend, precision, how = resolve(bundle, backend, precision, reporter=reporter(), **options)
    if how is not None:
        reporter().notice("--precision best:", how)
    return backend, precision
