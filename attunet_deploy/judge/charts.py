"""Hand-written SVG charts for report.html: Dice per judged image, latency per backend.

Plain SVG text (no matplotlib, no JavaScript): a few kilobytes, crisp at any zoom, readable in
any browser and in a mail client. Every mark carries a ``<title>`` with its exact figure, so a
hover tells the number the picture rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from attunet_deploy.judge.results import BenchResult, VerifyRow

#: Colours by verdict (the table uses the same).
STATUS_COLOUR = {"pass": "#1b7f3b", "fail": "#c62828", "unavailable": "#777777"}
#: Colours of latency bars, by precision (Tol's colour-blind-safe "bright" set).
PRECISION_COLOUR = {"fp32": "#4477AA", "fp16": "#228833", "bf16": "#CCBB44", "int8": "#AA3377"}
WIDTH = 900
LABEL_W = 190
RIGHT_PAD = 30
FONT = 'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12"'


def _svg(height: int, body: list[str], title: str) -> str:
    return (f'<svg role="img" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" {FONT}><title>{escape(title)}</title>' + "".join(body) + "</svg>")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def _axis(x0: float, x1: float, y: float, lo: float, hi: float, fmt: str, ticks: list[float]) -> list[str]:
    out = [f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#444"/>']
    for t in ticks:
        x = x0 + (t - lo) / (hi - lo) * (x1 - x0)
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle" fill="#333">{format(t, fmt)}</text>')
    return out


def dice_lower_bound(values: Sequence[float]) -> float:
    """Left end of the Dice axis: 0.95 or lower, in steps of 0.05, so every point shows."""
    low = min(values, default=1.0)
    return max(0.0, min(0.95, math.floor(low * 20) / 20))


def dice_strip(rows: Sequence[VerifyRow]) -> str:
    """One lane per judged row: a dot per image's Dice against the reference (and, with labels,
    a hollow diamond per image's Dice against the truth), the mean as a bar, the row's gates."""
    lanes = [(r, r.agreement) for r in rows if r.agreement is not None and r.agreement.dice_per_image]
    if not lanes:
        return ""
    values = [d for _, a in lanes for d in (*(a.dice_per_image or ()), *(a.gt_dice_per_image or ()))]
    lo, hi = dice_lower_bound(values), 1.0
    x0, x1 = LABEL_W, WIDTH - RIGHT_PAD

    def px(v: float) -> float:
        return x0 + (min(max(v, lo), hi) - lo) / (hi - lo) * (x1 - x0)

    body: list[str] = []
    y = 10
    for r, a in lanes:
        name = r.name
        dices = a.dice_per_image or ()
        colour = STATUS_COLOUR.get(str(r.status), "#333")
        body.append(f'<text x="{LABEL_W - 10}" y="{y + 19}" text-anchor="end" fill="#111">{escape(name)}</text>')
        body.append(f'<rect x="{x0}" y="{y + 2}" width="{x1 - x0}" height="26" fill="#f4f4f4"/>')
        tol = r.tolerance
        for key, dash, label in (("mean_dice", "5 3", "mean Dice gate"), ("worst_dice", "2 3", "worst Dice gate")):
            gate = tol.get(key)
            if isinstance(gate, (int, float)) and lo <= gate <= hi:
                body.append(f'<line x1="{px(gate):.1f}" y1="{y}" x2="{px(gate):.1f}" y2="{y + 30}" stroke="#555" '
                            f'stroke-dasharray="{dash}"><title>{label} {gate:g}</title></line>')
        for k, d in enumerate(dices):
            jitter = ((k * 0.618034) % 1.0 - 0.5) * 16
            body.append(f'<circle cx="{px(d):.1f}" cy="{y + 15 + jitter:.1f}" r="3.5" fill="{colour}" '
                        f'fill-opacity="0.65"><title>{escape(name)} image {k + 1}: Dice {d:.4f}</title></circle>')
        mean = sum(dices) / len(dices)
        body.append(f'<rect x="{px(mean) - 1.5:.1f}" y="{y + 1}" width="3" height="28" fill="#111">'
                    f'<title>{escape(name)} mean Dice {mean:.4f}</title></rect>')
        y += 32
        gts = a.gt_dice_per_image or ()
        if gts:
            body.append(f'<text x="{LABEL_W - 10}" y="{y + 15}" text-anchor="end" fill="#555">vs truth</text>')
            for k, d in enumerate(gts):
                cx, cy = px(d), y + 11 + ((k * 0.618034) % 1.0 - 0.5) * 8
                body.append(f'<path d="M{cx:.1f} {cy - 4:.1f} l4 4 l-4 4 l-4 -4 z" fill="none" stroke="#333">'
                            f'<title>{escape(name)} image {k + 1}: Dice vs truth {d:.4f}</title></path>')
            y += 24
    body += _axis(x0, x1, y + 4, lo, hi, ".2f", _ticks(lo, hi))
    body.append(f'<text x="{(x0 + x1) / 2}" y="{y + 36}" text-anchor="middle" fill="#333">Dice per image against '
                f'the reference (dots); bar = mean; dashed = mean gate; dotted = worst-image gate</text>')
    return _svg(y + 44, body, "Dice of every judged image, per backend and precision")


def latency_bars(results: Sequence[BenchResult]) -> str:
    """A bar per benchmark row: p50, with p90 and p99 marked, the ratio to the first row and the
    throughput written beside it."""
    if not results:
        return ""
    hi = max(float(r.latency_ms.get("p99", r.p50)) for r in results) * 1.05 or 1.0
    x0, x1 = LABEL_W, WIDTH - 250  # room right of the longest bar for "1234.56 ms · 12.34× · 0.7 img/s"
    body: list[str] = []
    y = 10
    for r in results:
        lat = r.latency_ms
        name = r.name

        def px(v: float) -> float:
            return x0 + max(0.0, v) / hi * (x1 - x0)

        colour = PRECISION_COLOUR.get(r.precision, "#666")
        body.append(f'<text x="{LABEL_W - 10}" y="{y + 16}" text-anchor="end" fill="#111">{escape(name)}</text>')
        body.append(f'<rect x="{x0}" y="{y + 3}" width="{px(lat["p50"]) - x0:.1f}" height="18" fill="{colour}">'
                    f'<title>{escape(name)} p50 {lat["p50"]:.3f} ms</title></rect>')
        for key, width in (("p90", 1.5), ("p99", 3)):
            if key in lat:
                body.append(f'<line x1="{px(lat[key]):.1f}" y1="{y}" x2="{px(lat[key]):.1f}" y2="{y + 24}" '
                            f'stroke="#111" stroke-width="{width}"><title>{key} {lat[key]:.3f} ms</title></line>')
        ratio = r.ratio_vs_first
        text = f"{lat['p50']:.2f} ms" + (f" · {ratio:.2f}×" if ratio is not None else "") \
            + f" · {r.throughput_ips:.1f} img/s"
        body.append(f'<text x="{x1 + 8}" y="{y + 16}" fill="#111">{escape(text)}</text>')
        y += 28
    body += _axis(x0, x1, y + 4, 0.0, hi, "g", _ticks(0.0, hi))
    first = results[0].name
    body.append(f'<text x="{(x0 + x1) / 2}" y="{y + 36}" text-anchor="middle" fill="#333">milliseconds per call '
                f'(bar = p50; thin mark = p90, thick = p99; × = p50 ratio to {escape(first)})</text>')
    return _svg(y + 44, body, "Latency per backend and precision")
