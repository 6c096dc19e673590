"""report.html: the verdict as a page people look at.

One self-contained file (pictures inlined as PNG data, charts as inline SVG, styles inline; no
network, no JavaScript) written beside report.md by ``pipeline`` and by ``verify``/``bench
--report DIR``. It reads the same records report.json is written from (the rows' ``to_dict()``),
plus the rows' mask panels (:mod:`attunet_deploy.judge.panels`), which JSON does not hold.

Sections: the verdict per backend/precision with the tolerance it was judged against; Dice of
every judged image per row; each row's worst images as panels; latency; the machine.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from attunet_deploy.bundle import Bundle
from attunet_deploy.fileio import dumps, write_text_atomic
from attunet_deploy.judge.charts import STATUS_COLOUR, dice_strip, latency_bars
from attunet_deploy.judge.panels import (
    AGREE_COLOUR,
    BACKEND_COLOUR,
    REFERENCE_COLOUR,
    TILE_TITLES,
    Panel,
    encode_png,
    render_panel,
)
from attunet_deploy.judge.report import BENCH_COLUMNS, render_report, report_intro
from attunet_deploy.judge.results import BenchResult, Status, VerifyRow

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;
color:#111;background:#fff;line-height:1.4;overflow-wrap:anywhere}
svg{max-width:100%;height:auto}.warn{border:2px solid #c62828;background:#fde7e6;padding:8px 14px;margin:12px 0}
#summary{border:1px solid #ccc;background:#f7f7f7;padding:8px 14px;margin:12px 0;font-size:15px}
details{margin:8px 0;font-size:13px}
h1{font-size:1.5em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:12px;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f2f2f2}td.l,th.l{text-align:left}td.w,th.w{white-space:normal;min-width:8em}
td.pass{background:#e3f4e8;color:#1b7f3b;font-weight:600}td.fail{background:#fde7e6;color:#c62828;font-weight:700}
td.unavailable{background:#eee;color:#666}
figure{margin:10px 0 22px 0}figure img{display:block;image-rendering:pixelated;border:1px solid #333;
max-width:100%;height:auto}
figcaption{font-size:13px;margin-top:4px}.tiles{display:flex;gap:6px;font-size:12px;color:#444}
.tiles span{flex:1;text-align:center}.muted{color:#666}.swatch{display:inline-block;width:12px;height:12px;
border:1px solid #555;vertical-align:middle;margin:0 4px 0 10px}
"""


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def tolerance_text(tol: Mapping[str, Any]) -> str:
    """'rel L2 <= 1e-04, pixels agree >= 99.99 %'-style text of a row's tolerance."""
    parts = []
    if tol.get("rel_l2") is not None:
        parts.append(f"rel L2 ≤ {tol['rel_l2']:g}")
    if tol.get("pixel_agreement") is not None:
        parts.append(f"pixels agree ≥ {100 * tol['pixel_agreement']:g} %")
    if tol.get("mean_dice") is not None:
        parts.append(f"mean Dice ≥ {tol['mean_dice']:g}")
    if tol.get("worst_dice") is not None:
        parts.append(f"worst Dice ≥ {tol['worst_dice']:g}")
    if tol.get("max_dice_drop") is not None:
        parts.append(f"Dice vs truth drop ≤ {tol['max_dice_drop']:g}")
    return ", ".join(parts) or "reported only"


def verdict_table(rows: Sequence[VerifyRow]) -> str:
    """The rows that ran (in their order); those unavailable here follow as one collapsed line per
    backend with its reason (:func:`unavailable_details`). Numbers never wrap; text cells do."""
    rows = [r for r in rows if r.status != Status.UNAVAILABLE]
    gt = any(r.metric("gt_dice") is not None for r in rows)
    heads = ["backend", "precision", "verdict", "judged against", "reference", "device", "rel L2",
             "pixels agree %", "mean Dice", "worst Dice"] + (["Dice vs truth"] if gt else []) + ["note"]
    left = {"backend", "precision", "verdict", "judged against", "reference", "device", "note"}
    out = ['<table id="verdict"><thead><tr>'
           + "".join(f'<th class="{"l" if h in left else ""}">{h}</th>' for h in heads) + "</tr></thead><tbody>"]
    for r in rows:
        status = str(r.status)
        agree = r.metric("pixel_agreement")
        cells = [(r.backend, "l"), (r.precision, "l"), (status.upper() if status == "fail" else status, status),
                 (tolerance_text(r.tolerance), "l w"), (r.reference, "l"),
                 (r.device or "", "l w"), (_f(r.metric("rel_l2"), ".2e"), ""),
                 ("-" if agree is None else f"{100 * agree:.4f}", ""), (_f(r.metric("mean_dice"), ".4f"), ""),
                 (_f(r.metric("worst_dice"), ".4f"), "")]
        if gt:
            cells.append((_f(r.metric("gt_dice"), ".4f"), ""))
        cells.append((r.reason, "l w"))
        out.append(f'<tr data-backend="{escape(r.backend)}" data-precision="{escape(r.precision)}" '
                   f'data-status="{escape(status)}">'
                   + "".join(f'<td class="{c}">{escape(str(v))}</td>' for v, c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def unavailable_details(rows: Sequence[VerifyRow]) -> str:
    """Rows that could not run here, one line per backend and reason, collapsed (no JavaScript)."""
    gone = [r for r in rows if r.status == Status.UNAVAILABLE]
    if not gone:
        return ""
    by: dict[tuple[str, str], list[str]] = {}
    for r in gone:
        by.setdefault((r.backend, r.reason), []).append(r.precision)
    items = "".join(f'<li data-backend="{escape(b)}" data-precisions="{escape(",".join(ps))}"><b>{escape(b)}</b> '
                    f'({escape(", ".join(ps))}): {escape(reason)}</li>' for (b, reason), ps in by.items())
    return (f'<details id="unavailable"><summary>{len(gone)} row(s) unavailable here, '
            f'{len({b for b, _ in by})} backend(s)</summary><ul>{items}</ul></details>')


def summary_block(rows: Sequence[VerifyRow], results: Sequence[BenchResult], ref: str) -> str:
    """The result first: the verdict, and the fastest (backend, precision) that passed with its speedup."""
    counts = {s: sum(str(r.status) == s for r in rows) for s in ("pass", "fail", "unavailable")}
    lines = [f'<b>Verdict against {escape(ref)}:</b> <span style="color:{STATUS_COLOUR["pass"]}">{counts["pass"]} '
             f'passed</span>, <span style="color:{STATUS_COLOUR["fail"]}">{counts["fail"]} failed</span>, '
             f'{counts["unavailable"]} unavailable here.']
    passed = {(r.backend, r.precision) for r in rows if r.status == Status.PASS}
    timed = [b for b in results if (b.backend, b.precision) in passed]
    if timed:
        best = min(timed, key=lambda b: b.p50)
        base = next((b for b in results if (b.backend, b.precision) == tuple(ref.split("/", 1))), None) or results[0]
        speed = f", {base.p50 / best.p50:.2f}× {escape(base.name)}" if base is not best and best.p50 > 0 else ""
        lines.append(f"<b>Fastest that passes:</b> {escape(best.name)}, {best.p50:.2f} ms p50{speed}.")
    return '<div id="summary">' + "<br>".join(lines) + "</div>"


def panel_figure(panel: Panel) -> str:
    rgb = render_panel(panel)
    data = base64.b64encode(encode_png(rgb)).decode("ascii")
    h, w = rgb.shape[:2]
    titles = "".join(f"<span>{t}</span>" for t in TILE_TITLES)
    return (f'<figure><img class="panel" src="data:image/png;base64,{data}" width="{w}" '
            f'height="{h}" alt="{escape(panel.label)}: input, reference, backend, difference">'
            f'<div class="tiles" style="max-width:{w}px">{titles}</div>'
            f'<figcaption>{escape(panel.label)} · Dice against the reference {panel.dice:.4f} · '
            f'{panel.image.shape[1]}×{panel.image.shape[0]} px</figcaption></figure>')


def legend() -> str:
    return (f'<p>Outlines: <span class="swatch" style="background:{_hex(REFERENCE_COLOUR)}"></span>reference '
            f'<span class="swatch" style="background:{_hex(BACKEND_COLOUR)}"></span>backend. Difference map: '
            f'<span class="swatch" style="background:{_hex(AGREE_COLOUR)}"></span>foreground in both (agree)'
            f'<span class="swatch" style="background:{_hex(REFERENCE_COLOUR)}"></span>only in the reference '
            f'(missed)<span class="swatch" style="background:{_hex(BACKEND_COLOUR)}"></span>only in the backend '
            f'(added). Colour-blind-safe pair (Paul Tol); tiles upscaled with nearest-neighbour.</p>')


def worst_sections(rows: Sequence[VerifyRow]) -> str:
    """Each row that ran, failures first, then by mean Dice (lowest first): what needs a look leads."""
    ran = [r for r in rows if r.status != Status.UNAVAILABLE]
    out = [legend()]
    for r in sorted(ran, key=lambda r: (r.status != Status.FAIL, r.mean_dice or 0.0)):
        name = r.name
        got = r.panels
        colour = STATUS_COLOUR.get(str(r.status), "#333")
        flipped = r.metric("flipped_pixels")
        out.append(f'<h3 id="worst-{escape(name.replace("/", "-"))}"><span style="color:{colour}">■</span> '
                   f'{escape(name)} · mean Dice {_f(r.mean_dice, ".4f")} · '
                   f'worst {_f(r.metric("worst_dice"), ".4f")} · '
                   f'{"-" if flipped is None else flipped} pixels differ</h3>')
        if not got:
            out.append('<p class="muted">No pictures: the masks were not kept with these results.</p>')
        out += [panel_figure(p) for p in got]
    return "".join(out)


def machine_section(machine: Mapping[str, Any], versions: Mapping[str, Any], gpu: Any) -> str:
    gpu_text = "none" if not gpu else ", ".join(f"{k} {v}" for k, v in dict(gpu).items())
    rows = [("CPU", f"{machine.get('cpu_model', '?')} ({machine.get('cores', '?')} cores, {machine.get('arch', '?')})"),
            ("ISA flags", " ".join(machine.get("isa", [])) or "-"), ("GPU", gpu_text),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))]
    return '<table id="machine">' + "".join(f'<tr><th class="l">{k}</th><td class="l">{escape(str(v))}</td></tr>'
                                             for k, v in rows) + "</table>"


def bench_table_html(results: Sequence[BenchResult]) -> str:
    heads = [h for h, _ in BENCH_COLUMNS]
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < 4 else ""}">{escape(str(fn(r)))}</td>'
                                    for i, (_, fn) in enumerate(BENCH_COLUMNS)) + "</tr>" for r in results)
    return ('<table id="latency"><thead><tr>' + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>"
            + body + "</tbody></table>")


def render_html(rows: Sequence[VerifyRow], results: Sequence[BenchResult], data: Mapping[str, Any],
                intro: Sequence[str]) -> str:
    """The whole page: the rows (their mask panels included), the benchmark results, and from
    ``data`` (what report.json holds) the title, notes and machine; ``intro`` lines of plain text
    under the title."""
    counts = {s: sum(str(r.status) == s for r in rows) for s in ("pass", "fail", "unavailable")}
    ref = rows[0].reference if rows else "torch/fp32"
    title = escape(str(data.get("title", "attunet-deploy report")))
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f"<title>{title}</title><style>{CSS}</style></head><body>", f"<h1>{title}</h1>"]
    parts += [f'<p class="muted">{escape(line)}</p>' for line in intro]
    warnings = [w for w in data.get("warnings") or [] if isinstance(w, str)]
    if warnings:
        parts.append('<div class="warn" id="warnings"><b>This verification proves little:</b><ul>'
                     + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul></div>")
    if rows:
        parts.append(summary_block(rows, results, str(ref)))
    if results:  # the result a reader came for, right after the verdict
        shape = "x".join(map(str, results[0].shape))
        parts.append(f'<h2 id="latency-heading">Latency at {escape(shape)}</h2>{latency_bars(results)}'
                     f"{bench_table_html(results)}")
    if rows:
        parts.append(f'<h2 id="verdict-heading">Verdict against {escape(str(ref))}: '
                     f'<span style="color:{STATUS_COLOUR["pass"]}">{counts["pass"]} passed</span>, '
                     f'<span style="color:{STATUS_COLOUR["fail"]}">{counts["fail"]} failed</span>, '
                     f'{counts["unavailable"]} unavailable here</h2>')
        parts.append(verdict_table(rows) + unavailable_details(rows))
        strip = dice_strip(rows)
        parts.append("<h2>Dice of every judged image</h2>" + (strip or '<p class="muted">No row ran.</p>'))
        parts.append(f"<h2>Worst images per backend</h2>{worst_sections(rows)}")
    for key, value in (data.get("notes") or {}).items():
        if isinstance(value, str):
            parts.append(f"<h2>{escape(key)}</h2><p>{escape(value)}</p>")
    m = data.get("machine") or {}
    parts.append("<h2>Machine</h2>" + machine_section(m.get("cpu", {}), m.get("versions", {}), m.get("gpu")))
    parts.append("</body></html>")
    return "\n".join(parts)


def report_files(bundle: Bundle, verify_rows: Sequence[VerifyRow], bench_rows: Sequence[BenchResult],
                 extra: Mapping[str, str] | None = None, warnings: Sequence[str] = ()) -> dict[str, str]:
    """report.json, report.md and report.html of one run, by file name. The page's mask panels come
    from the rows (``VerifyRow.panels``: kept by verify, never in JSON)."""
    data, md = render_report(bundle, verify_rows, bench_rows, extra, warnings)
    intro = report_intro(bundle, str(data["generated"]))
    html = render_html(verify_rows, bench_rows, data, intro)
    return {"report.json": dumps(data) + "\n", "report.md": md, "report.html": html}


def write_report_dir(folder: str | os.PathLike[str], files: Mapping[str, str]) -> None:
    """``--report DIR``: the report's files, each written atomically (DIR was checked before the run)."""
    for name, text in files.items():
        write_text_atomic(Path(folder) / name, text)
