"""Every table the CLI prints (verify and bench tables come from :mod:`attunet_deploy.judge.report`,
which also writes report.md from them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attunet_deploy.judge.results import BenchResult, Skip, VerifyRow
from attunet_deploy.tables import fit

if TYPE_CHECKING:
    from attunet_deploy.apps.dicom.files import SegRow
    from attunet_deploy.apps.predict import PredictRow
    from attunet_deploy.steps.engines import EngineRecord


def stdout() -> Any:
    from rich.console import Console

    # Pipes and CI logs get a wide table rather than rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 160)


def print_bundle_summary(bundle: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from attunet_deploy.io.golden import describe

    table = Table(title=f"Bundle {escape(str(bundle.root))}", title_justify="left", show_header=True)
    table.add_column("artifact")
    table.add_column("precision")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    table.add_column("made by")
    for name, entry in sorted(bundle.artifacts.items()):
        present = "" if os.path.lexists(bundle.path(name)) else " [red](missing)[/red]"
        table.add_row(escape(name) + present, entry.precision or "-", size_text(entry.bytes),
                      entry.sha256[:12], escape(entry.producer.made_by()))
    out = stdout()
    src = bundle.source
    spec = bundle.spec
    out.print(escape(f"{bundle.describe_model()} · {src.parameters:,} parameters · from {src.layout} "
                     if src.parameters is not None else f"{bundle.describe_model()} · ")
              + escape(f"{Path(src.path).name} · normalisation: {spec.normalization.describe()} · post: "
                       f"{spec.postprocessing.kind}"), highlight=False)
    out.print(escape(describe(bundle.golden)), highlight=False)
    out.print(fit(table))


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]  # bytes become a float number of KB, MB, GB
    return str(n)


def print_accuracy_aware(bundle: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    entry = bundle.artifact("model.int8.onnx")
    aa = entry.producer.get("accuracy_aware") if entry is not None else None
    if not aa:
        return
    table = Table(title=f"Accuracy-aware INT8 (target mean Dice vs FP32 >= {aa['target_mean_dice']:.4f})",
                  title_justify="left")
    for col in ("step", "returned to float", "mean Dice", "latency ms (ORT CPU)"):
        table.add_column(col)
    for i, st in enumerate(aa["steps"]):
        table.add_row(str(i), escape(", ".join(st["float_added"]) or "-"), f"{st['mean_dice']:.4f}",
                      f"{st['latency_ms']:.1f}")
    stdout().print(fit(table))


def print_bench(results: Sequence[BenchResult], skipped: Sequence[Skip], shape: tuple[int, ...], *,
                end_to_end: bool, concurrency: int) -> None:
    """The latency table (CPU and ISA in its title), unstable-timing warnings, skipped rows."""
    from rich.markup import escape

    from attunet_deploy.judge.bench import COV_WARNING
    from attunet_deploy.judge.report import bench_table

    out = stdout()
    if results:
        m = results[0].machine
        out.print(bench_table(results, title=f"Latency at {'x'.join(map(str, shape))}"
                              + (" (end-to-end)" if end_to_end else "")
                              + (" (whole volume, sliding window)" if results[0].mode == "volume" else "")
                              + (f", concurrency {concurrency}" if concurrency > 1 else "")
                              + f" · {m.get('cpu_model', '?')} ({m.get('cores', '?')} cores; "
                              + f"{' '.join(m.get('isa', [])) or 'no AVX2'})"))
    for r in results:
        if r.cov > COV_WARNING:
            out.print(f"[yellow]warning:[/yellow] {r.name} timing unstable "
                      f"(CoV {100 * r.cov:.1f}% > {100 * COV_WARNING:.0f}%): close other programs or use --duration")
    for sk in skipped:
        out.print(f"[dim]skipped {sk.backend}/{sk.precision}: {escape(sk.reason)}[/dim]", highlight=False)


def print_engines(results: Sequence[EngineRecord]) -> None:
    from rich.table import Table

    table = Table(title="TensorRT engines", title_justify="left")
    for col in ("precision", "engine", "status", "layers by precision", "build s"):
        table.add_column(col)
    for r in results:
        table.add_row(r.precision, r.engine, r.status, ", ".join(f"{k} {v}" for k, v in r.layer_precisions.items()),
                      f"{r.build_seconds:.1f}")
    stdout().print(fit(table))


def print_segs(rows: Sequence[SegRow], out: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"DICOM results written to {escape(out)}", title_justify="left")
    for col in ("series", "slices", "slices with a segment", "files", "QA", "backend"):
        table.add_column(col, overflow="fold")
    for r in rows:
        qa = "[green]ok[/green]" if r.qa.status == "ok" else "[bold yellow]review[/bold yellow]"
        table.add_row(escape(r.series), str(r.slices), str(r.frames), str(len(r.outputs)), qa, r.backend)
    stdout().print(fit(table))
    for r in rows:
        for reason in r.qa.reasons:
            stdout().print(f"[yellow]review[/yellow] {escape(r.series)}: {escape(reason)}", highlight=False)


def print_masks(results: Sequence[PredictRow], out: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Masks written to {escape(out)}", title_justify="left")
    for col in ("input", "shape", "foreground px", "mask", "backend"):
        table.add_column(col)
    for r in results:
        table.add_row(escape(r.input), "x".join(map(str, r.shape)), str(r.foreground), escape(r.mask), r.backend)
    stdout().print(fit(table))


def print_triton_repository(models: list[str], out: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Triton model repository {escape(out)}", title_justify="left")
    table.add_column("model")
    table.add_column("serves")
    for m in models:
        what = {"attunet_segment": "raw image -> uint8 mask (ensemble)", "attunet_pre": "normalise + pad (python)",
                "attunet_post": "crop + mask (python)", "attunet_cpu": "model.onnx on ONNX Runtime (python backend)",
                "attunet_volume": "raw volume -> mask: sliding window, windows by BLS (python)"}
        table.add_row(m, what.get(m, "TensorRT plan" if m.startswith("attunet_trt_") else "ONNX (onnxruntime backend)"))
    stdout().print(fit(table))
    stdout().print(f"serve it: see {escape(str(Path(out) / 'README.md'))}", highlight=False)


def print_bundle_state(bundle: Any) -> None:
    """TensorRT lint per graph, the INT8 calibration set, the last recorded verification."""
    from rich.markup import escape
    from rich.table import Table

    from attunet_deploy.bundle import ONNX_FILES

    out = stdout()
    for precision, name in ONNX_FILES.items():
        entry = bundle.artifact(name)
        if entry is not None:
            issues = entry.extra.get("trt_lint")
            state = "not checked" if issues is None else "ok" if not issues else "; ".join(map(str, issues[:3]))
            out.print(f"TensorRT lint {precision}: {escape(state)}", highlight=False)
    int8 = bundle.artifact(ONNX_FILES["int8"])
    if int8 is not None and int8.producer.get("calibration"):
        files = int8.producer.calibration_files
        out.print(escape(f"INT8 calibration: {int8.producer.get('calibration')}"
                         + (f"; files: {', '.join(files[:5])}" + (" ..." if len(files) > 5 else "") if files else "")),
                  highlight=False)
    ver = bundle.verification_records()
    ver = {k: v for k, v in ver.items() if v.get("status") != "unavailable"}  # only runs that ran are records
    if ver:
        table = Table(title="Last recorded verification", title_justify="left")
        for col in ("backend/precision", "status", "rel L2", "mean Dice", "Dice vs truth", "when"):
            table.add_column(col)

        def num(value: Any, fmt: str) -> str:
            return "-" if not isinstance(value, (int, float)) else format(value, fmt)

        for key, raw in sorted(ver.items()):
            r = VerifyRow.from_dict(raw)
            table.add_row(escape(key), escape(str(r.status)), num(r.metric("rel_l2"), ".2e"),
                          num(r.mean_dice, ".4f"), num(r.metric("gt_dice"), ".4f"), escape(str(raw.get("time", ""))))
        stdout().print(fit(table))
    else:
        stdout().print("not verified yet: run 'attdeploy verify'")


def print_doctor(probes: list[Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

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
    stdout().print(fit(table))
