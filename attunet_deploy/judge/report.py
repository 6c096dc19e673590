"""Tables for the terminal and the bundle's report.md / report.json."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attunet_deploy.bundle import Bundle, now_iso
from attunet_deploy.judge.markdown import markdown_table, md_escape
from attunet_deploy.judge.results import BenchResult, Status, VerifyRow
from attunet_deploy.tables import fit

_STATUS_STYLE = {Status.PASS.value: "[green]pass[/green]", Status.FAIL.value: "[bold red]FAIL[/bold red]",
                 Status.UNAVAILABLE.value: "[dim]unavailable[/dim]"}


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.4f}"


VerifyColumn = tuple[str, Callable[[VerifyRow], str]]


def verify_columns(rows: Sequence[VerifyRow]) -> list[VerifyColumn]:
    """(header, row -> text) pairs shared by the rich table and the markdown report."""
    m = VerifyRow.metric
    cols: list[VerifyColumn] = [
        ("backend", lambda r: r.backend),
        ("precision", lambda r: r.precision),
        ("status", lambda r: str(r.status)),
        ("rel L2", lambda r: _fmt(m(r, "rel_l2"), ".2e")),
        ("max abs err", lambda r: _fmt(m(r, "max_abs"), ".2e")),
        ("pixels agree %", lambda r: _pct(m(r, "pixel_agreement"))),
        ("mean Dice", lambda r: _fmt(m(r, "mean_dice"), ".4f")),
        ("worst Dice", lambda r: _fmt(m(r, "worst_dice"), ".4f")),
        ("mean IoU", lambda r: _fmt(m(r, "mean_iou"), ".4f")),
        ("flips (confident)", lambda r: "-" if r.agreement is None
         else f"{r.agreement.flipped_pixels} ({r.agreement.confident_flips})"),
    ]
    if any(m(r, "gt_dice") is not None for r in rows):
        cols.append(("Dice vs truth", lambda r: _fmt(m(r, "gt_dice"), ".4f")))
        cols.append(("drop vs ref", lambda r: _fmt(m(r, "gt_dice_drop"), "+.4f")))
    if any(r.reason for r in rows):
        cols.append(("note", lambda r: r.reason))
    return cols


def verify_table(rows: Sequence[VerifyRow], title: str = "Verification against PyTorch FP32") -> Any:
    """Rows that ran as a table; unavailable ones grouped into a caption (same reason, one line)."""
    from rich.markup import escape
    from rich.table import Table

    ran = [r for r in rows if r.status != Status.UNAVAILABLE]
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.status == Status.UNAVAILABLE:
            grouped.setdefault((r.backend, r.reason), []).append(r.precision)
    caption = "\n".join(f"unavailable here: {b} ({', '.join(p)}): {escape(reason)}"
                        for (b, reason), p in grouped.items()) or None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    rows = ran
    cols = verify_columns(rows)
    for header, _ in cols:
        table.add_column(header, justify="left" if header in ("backend", "precision", "status", "note")
                         else "right", overflow="fold", max_width=60 if header == "note" else None)
    for r in rows:
        cells = [escape(str(fn(r))) for _, fn in cols]
        cells[2] = _STATUS_STYLE.get(str(r.status), str(r.status))
        table.add_row(*cells)
    return fit(table)


BENCH_COLUMNS: list[tuple[str, Callable[[BenchResult], str]]] = [
    ("backend", lambda r: r.backend),
    ("precision", lambda r: r.precision),
    ("device", lambda r: r.device),
    ("shape", lambda r: "x".join(map(str, r.shape))),
    ("p50 ms", lambda r: f"{r.latency_ms['p50']:.2f}"),
    ("mean ms", lambda r: f"{r.latency_ms['mean']:.2f}"),
    ("p90 ms", lambda r: f"{r.latency_ms['p90']:.2f}"),
    ("p99 ms", lambda r: f"{r.latency_ms['p99']:.2f}"),
    ("min ms", lambda r: f"{r.latency_ms['min']:.2f}"),
    ("max ms", lambda r: f"{r.latency_ms['max']:.2f}"),
    ("img/s", lambda r: f"{r.throughput_ips:.1f}"),
    ("CoV %", lambda r: f"{100 * r.cov:.1f}"),
    ("RSS MB", lambda r: "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"),
    ("ratio", lambda r: "-" if r.ratio_vs_first is None else f"{r.ratio_vs_first:.2f}x"),
]


def bench_table(results: Sequence[BenchResult], title: str = "Latency") -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in BENCH_COLUMNS:
        table.add_column(header, justify="left" if header in ("backend", "precision", "device", "shape")
                         else "right")
    for r in results:
        table.add_row(*[fn(r) for _, fn in BENCH_COLUMNS])
    return fit(table)


def machine_record() -> dict[str, Any]:
    """The machine a report's figures come from: CPU and ISA flags, GPU (None without one), versions."""
    from attunet_deploy.environment import gpu_identity, machine_info, nvidia_smi_gpus, versions

    gpu: Any = gpu_identity()
    if gpu is None:
        smi = nvidia_smi_gpus()
        gpu = {"name": smi.detail, "driver": smi.version} if smi.available else None
    return {"cpu": machine_info(), "gpu": gpu, "versions": versions()}


def render_report(bundle: Bundle, verify_rows: Sequence[VerifyRow], bench_rows: Sequence[BenchResult],
                  extra: Mapping[str, str] | None = None, warnings: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """(report.json data, report.md text) of a pipeline, verify or bench run; ``warnings`` say when the
    verification proves little (judge/degenerate.py)."""
    data = {"bundle": str(bundle.root), "title": f"attunet-deploy report: {bundle.root.name}",
            "generated": now_iso(), **bundle.report_header(), "machine": machine_record(),
            "warnings": list(warnings),
            "verification": [r.to_dict() for r in verify_rows], "benchmarks": [r.to_dict() for r in bench_rows],
            "notes": dict(extra or {}), **(extra or {})}
    intro = report_intro(bundle, str(data["generated"]))
    ref = verify_rows[0].reference if verify_rows else "torch/fp32"
    md = [f"# {md_escape(data['title'])}", "", *[md_escape(line) + "\n" for line in intro]]
    if warnings:
        md += ["## Warnings", "", *[f"- {md_escape(w)}" for w in warnings], ""]
    if verify_rows:
        vcols = verify_columns(verify_rows)
        md += [f"## Verification against {ref}", "",
               markdown_table([h for h, _ in vcols], [[fn(r) for _, fn in vcols] for r in verify_rows]), ""]
        worst = [r for r in verify_rows if r.worst_images]
        if worst:
            md += ["Lowest Dice against the reference, per backend: "
                   + "; ".join(f"{r.name}: " + ", ".join(f"{md_escape(w.file)} {w.dice:.4f}" for w in r.worst_images)
                               for r in worst), ""]
    if bench_rows:
        mach = bench_rows[0].machine
        md += ["## Latency", "",
               f"Machine: {mach.get('cpu_model', '?')}, {mach.get('cores', '?')} cores, ISA "
               f"{' '.join(mach.get('isa', [])) or '-'}.", "",
               markdown_table([h for h, _ in BENCH_COLUMNS], [[fn(r) for _, fn in BENCH_COLUMNS] for r in bench_rows]),
               ""]
    for key, value in (extra or {}).items():
        md += [f"## {key}", "", value, ""]
    return data, "\n".join(md)


def report_intro(bundle: Bundle, generated: str) -> list[str]:
    from attunet_deploy.io.golden import describe

    src = bundle.source
    params = "?" if src.parameters is None else src.parameters
    return [f"Generated {generated}. Model: {bundle.describe_model()} ({params} parameters), from {src.path}.",
            describe(bundle.golden).capitalize() + "."]
