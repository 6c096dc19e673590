"""Tables for the terminal and the bundle's report.md / report.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attunet_deploy.bundle import Bundle, now_iso
from attunet_deploy.judge.results import Status

_STATUS_STYLE = {Status.PASS.value: "[green]pass[/green]", Status.FAIL.value: "[bold red]FAIL[/bold red]",
                 Status.UNAVAILABLE.value: "[dim]unavailable[/dim]"}


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.4f}"


def verify_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """(header, row -> text) pairs shared by the rich table and the markdown report."""
    cols: list[tuple[str, Any]] = [
        ("backend", lambda r: r["backend"]),
        ("precision", lambda r: r["precision"]),
        ("status", lambda r: r["status"]),
        ("rel L2", lambda r: _fmt(r.get("rel_l2"), ".2e")),
        ("max abs err", lambda r: _fmt(r.get("max_abs"), ".2e")),
        ("pixels agree %", lambda r: _pct(r.get("pixel_agreement"))),
        ("mean Dice", lambda r: _fmt(r.get("mean_dice"), ".4f")),
        ("worst Dice", lambda r: _fmt(r.get("worst_dice"), ".4f")),
        ("mean IoU", lambda r: _fmt(r.get("mean_iou"), ".4f")),
        ("flips (confident)", lambda r: "-" if r.get("flipped_pixels") is None
         else f"{r['flipped_pixels']} ({r['confident_flips']})"),
    ]
    if any("gt_dice" in r for r in rows):
        cols.append(("Dice vs truth", lambda r: _fmt(r.get("gt_dice"), ".4f")))
        cols.append(("drop vs ref", lambda r: _fmt(r.get("gt_dice_drop"), "+.4f")))
    if any(r.get("reason") for r in rows):
        cols.append(("note", lambda r: r.get("reason", "")))
    return cols


def verify_table(rows: Sequence[Mapping[str, Any]], title: str = "Verification against PyTorch FP32") -> Any:
    """Rows that ran as a table; unavailable ones grouped into a caption (same reason, one line)."""
    from rich.markup import escape
    from rich.table import Table

    ran = [r for r in rows if r["status"] != Status.UNAVAILABLE]
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] == Status.UNAVAILABLE:
            grouped.setdefault((r["backend"], r.get("reason", "")), []).append(r["precision"])
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
        cells[2] = _STATUS_STYLE.get(r["status"], r["status"])
        table.add_row(*cells)
    return table


BENCH_COLUMNS: list[tuple[str, Any]] = [
    ("backend", lambda r: r["backend"]),
    ("precision", lambda r: r["precision"]),
    ("device", lambda r: r.get("device", "")),
    ("shape", lambda r: "x".join(map(str, r["shape"]))),
    ("p50 ms", lambda r: f"{r['latency_ms']['p50']:.2f}"),
    ("mean ms", lambda r: f"{r['latency_ms']['mean']:.2f}"),
    ("p90 ms", lambda r: f"{r['latency_ms']['p90']:.2f}"),
    ("p99 ms", lambda r: f"{r['latency_ms']['p99']:.2f}"),
    ("min ms", lambda r: f"{r['latency_ms']['min']:.2f}"),
    ("max ms", lambda r: f"{r['latency_ms']['max']:.2f}"),
    ("img/s", lambda r: f"{r['throughput_ips']:.1f}"),
    ("CoV %", lambda r: f"{100 * r['cov']:.1f}"),
    ("RSS MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
    ("vs first", lambda r: "-" if r.get("ratio_vs_first") is None else f"{r['ratio_vs_first']:.2f}x"),
]


def bench_table(results: Sequence[Mapping[str, Any]], title: str = "Latency") -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header, _ in BENCH_COLUMNS:
        table.add_column(header, justify="left" if header in ("backend", "precision", "device", "shape")
                         else "right")
    for r in results:
        table.add_row(*[fn(r) for _, fn in BENCH_COLUMNS])
    return table


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(h.replace("|", "/") for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_record() -> dict[str, Any]:
    """The machine a report's figures come from: CPU and ISA flags, GPU (None without one), versions."""
    from attunet_deploy.environment import gpu_identity, machine_info, nvidia_smi_gpus, versions

    gpu: Any = gpu_identity()
    if gpu is None:
        smi = nvidia_smi_gpus()
        gpu = {"name": smi.detail, "driver": smi.version} if smi.available else None
    return {"cpu": machine_info(), "gpu": gpu, "versions": versions()}


def render_report(bundle: Bundle, verify_rows: Sequence[Mapping[str, Any]], bench_rows: Sequence[Mapping[str, Any]],
                  extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(report.json data, report.md text) of a pipeline, verify or bench run."""
    m = bundle.manifest
    data = {"bundle": str(bundle.root), "title": f"attunet-deploy report: {bundle.root.name}",
            "generated": now_iso(), "model": m["model"], "preprocessing": m["preprocessing"],
            "golden": m.get("golden", {}), "machine": machine_record(),
            "verification": [dict(r) for r in verify_rows], "benchmarks": [dict(r) for r in bench_rows],
            "notes": {k: v for k, v in (extra or {}).items() if isinstance(v, str)}, **(extra or {})}
    intro = report_intro(bundle, data)
    ref = verify_rows[0].get("reference", "torch/fp32") if verify_rows else "torch/fp32"
    md = [f"# {data['title']}", "", *[line + "\n" for line in intro]]
    if verify_rows:
        vcols = verify_columns(verify_rows)
        md += [f"## Verification against {ref}", "",
               markdown_table([h for h, _ in vcols], [[fn(r) for _, fn in vcols] for r in verify_rows]), ""]
        worst = [r for r in verify_rows if r.get("worst_images")]
        if worst:
            md += ["Lowest Dice against the reference, per backend: "
                   + "; ".join(f"{r['backend']}/{r['precision']}: "
                               + ", ".join(f"{w['file']} {w['dice']:.4f}" for w in r["worst_images"])
                               for r in worst), ""]
    if bench_rows:
        mach = bench_rows[0].get("machine", {})
        md += ["## Latency", "",
               f"Machine: {mach.get('cpu_model', '?')}, {mach.get('cores', '?')} cores, ISA "
               f"{' '.join(mach.get('isa', [])) or '-'}.", "",
               markdown_table([h for h, _ in BENCH_COLUMNS], [[fn(r) for _, fn in BENCH_COLUMNS] for r in bench_rows]),
               ""]
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            md += [f"## {key}", "", value, ""]
    return data, "\n".join(md)


def report_intro(bundle: Bundle, data: Mapping[str, Any]) -> list[str]:
    from attunet_deploy.io.golden import describe

    m = bundle.manifest
    return [f"Generated {data['generated']}. Model: {bundle.describe_model()} "
            f"({m['model']['source'].get('parameters', '?')} parameters), from `{m['model']['source'].get('path')}`.",
            describe(m.get("golden") or {}).capitalize() + "."]
