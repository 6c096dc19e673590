"""The report's pictures: mask panels (colours, crop, upscaling), the PNG encoder, the SVG charts."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from attunet_deploy.judge.charts import dice_lower_bound, dice_strip, latency_bars
from attunet_deploy.judge.panels import (
    AGREE_COLOUR,
    BACKEND_COLOUR,
    GAP,
    MIN_TILE,
    REFERENCE_COLOUR,
    Panel,
    crop_box,
    encode_png,
    render_panel,
)
from attunet_deploy.judge.report_html import render_html, tolerance_text
from attunet_deploy.judge.results import Agreement, BenchResult, Status, VerifyRow


def _panel(size: int = 64) -> Panel:
    ref = np.zeros((size, size), np.uint8)
    ref[10:30, 10:30] = 1
    out = np.zeros((size, size), np.uint8)
    out[10:30, 14:34] = 1  # agree on 10:30 x 14:30, missed 10:14, added 30:34
    image = np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size)
    return Panel("case.png", 0.8, image, ref, out)


def _tile(rgb: np.ndarray, k: int) -> np.ndarray:
    w = (rgb.shape[1] - 3 * GAP) // 4
    return rgb[:, k * (w + GAP): k * (w + GAP) + w]


def test_panel_tiles_are_upscaled_and_the_difference_map_marks_each_class() -> None:
    rgb = render_panel(_panel())
    scale = MIN_TILE // 64
    assert rgb.shape == (64 * scale, 4 * 64 * scale + 3 * GAP, 3) and rgb.dtype == np.uint8
    diff = _tile(rgb, 3).astype(int)

    def at(y: int, x: int) -> np.ndarray:  # the centre of a native pixel, in the upscaled tile
        return diff[y * scale + scale // 2, x * scale + scale // 2]

    assert np.array_equal(at(20, 12), REFERENCE_COLOUR)  # only in the reference: missed
    assert np.array_equal(at(20, 32), BACKEND_COLOUR)  # only in the backend: added
    agree = at(20, 20)
    assert np.all(np.abs(agree - np.asarray(AGREE_COLOUR)) < 40) and agree[0] == agree[1] == agree[2]
    background = at(50, 50)
    assert background[0] == background[1] == background[2] and background[0] < 120  # dimmed grey
    # outlines: the reference's in orange on tile 2, the backend's in sky blue on tile 3, nothing else coloured
    ref_tile, out_tile = _tile(rgb, 1).reshape(-1, 3), _tile(rgb, 2).reshape(-1, 3)
    assert (ref_tile == REFERENCE_COLOUR).all(axis=1).sum() > 0 and not (ref_tile == BACKEND_COLOUR).all(axis=1).any()
    assert (out_tile == BACKEND_COLOUR).all(axis=1).sum() > 0 and not (out_tile == REFERENCE_COLOUR).all(axis=1).any()
    first = _tile(rgb, 0)
    assert (first[..., 0] == first[..., 1]).all() and (first[..., 1] == first[..., 2]).all()


def test_large_images_are_cropped_to_where_the_masks_differ() -> None:
    big = np.zeros((1024, 1024), np.uint8)
    big[600:640, 300:340] = 1
    out = big.copy()
    out[600:610, 300:340] = 0
    p = Panel("ct", 0.9, np.zeros((1024, 1024), np.float32), big, out)
    y0, y1, x0, x1 = crop_box(p)
    assert y0 <= 600 and y1 >= 610 and x0 <= 300 and x1 >= 340 and (y1 - y0) < 200 and (x1 - x0) < 200
    tile = (render_panel(p).shape[1] - 3 * GAP) // 4
    assert MIN_TILE <= tile <= 2 * MIN_TILE
    # masks that agree: the crop follows the foreground; no foreground at all: the whole image
    assert crop_box(Panel("ct", 1.0, p.image, big, big))[0] <= 600
    empty = np.zeros_like(big)
    assert crop_box(Panel("ct", 1.0, p.image, empty, empty)) == (0, 1024, 0, 1024)


def test_png_encoder_round_trips_through_a_real_decoder() -> None:
    image = pytest.importorskip("PIL.Image")
    rgb = render_panel(_panel(40))
    rgb[0, 0] = (1, 2, 3)  # a row unlike the one below it ('Sub' filter) and repeated rows ('Up')
    decoded = np.asarray(image.open(io.BytesIO(encode_png(rgb))).convert("RGB"))
    assert np.array_equal(decoded, rgb)
    grey = (np.arange(30 * 7) % 256).astype(np.uint8).reshape(30, 7)
    assert np.array_equal(np.asarray(image.open(io.BytesIO(encode_png(grey)))), grey)


def _row(backend: str, dices: list[float], status: str = "pass", gt: list[float] | None = None,
         panels: tuple[Panel, ...] = ()) -> VerifyRow:
    a = Agreement(rel_l2=0.0, max_abs=0.0, mean_abs=0.0, pixel_agreement=1.0, mean_dice=float(np.mean(dices)),
                  worst_dice=min(dices), mean_iou=1.0, flipped_pixels=0, confident_flips=0, images=len(dices),
                  worst_images=(), dice_per_image=tuple(dices), gt_dice_per_image=tuple(gt) if gt else None)
    return VerifyRow(backend, "int8", "torch/fp32", Status(status), tolerance={"mean_dice": 0.98, "worst_dice": 0.95},
                     agreement=a, panels=panels)


def _bench(precision: str, p50: float) -> BenchResult:
    return BenchResult("ort", precision, "cpu", (1, 1, 64, 64), "compute", 1, 1,
                       {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3}, 1000 / p50, 0.0, None, 1, 1, "", {}, {},
                       ratio_vs_first=p50 / 40, has_ratio=True)


def test_svg_charts_parse_and_carry_every_point() -> None:
    rows = [_row("ort", [0.99, 0.97, 1.0]), _row("ov", [0.5, 0.99], "fail", gt=[0.9, 0.8])]
    svg = ET.fromstring(dice_strip(rows))
    assert len(svg.findall(".//circle")) == 5 and len(svg.findall(".//path")) == 2
    titles = [t.text for t in svg.iter("title")]
    assert any("Dice 0.5000" in (t or "") for t in titles) and any("mean Dice gate 0.98" in (t or "") for t in titles)
    assert dice_lower_bound([0.993, 0.97]) == 0.95 and dice_lower_bound([0.5]) == 0.5 and dice_lower_bound([]) == 0.95
    bench = [_bench(p, v) for p, v in (("fp32", 40.0), ("int8", 20.0))]
    bars = ET.fromstring(latency_bars(bench))
    widths = [float(r.get("width", 0)) for r in bars.findall(".//rect")]
    assert widths[1] == pytest.approx(widths[0] / 2, rel=1e-3)  # bars are proportional to p50
    assert "0.50×" in ET.tostring(bars, encoding="unicode")
    assert dice_strip([]) == "" and latency_bars([]) == ""


def test_page_is_self_contained_and_escapes_what_it_shows() -> None:
    rows = [_row("ort", [0.99], panels=(_panel(),)),
            VerifyRow("trt", "fp16", "torch/fp32", Status.UNAVAILABLE, "<script>alert(1)</script>", {"rel_l2": 0.01})]
    page = render_html(rows, [], {"title": "r", "machine": {}}, ["intro"])
    assert VerifyRow.from_dict(rows[0].to_dict()) == rows[0]  # the JSON edge round trip (panels aside)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count('class="panel"') == 1 and 'data-backend="trt"' in page
    assert "http://" not in page and "https://" not in page
    assert tolerance_text({"rel_l2": 1e-4, "pixel_agreement": 0.9999}) == "rel L2 ≤ 0.0001, pixels agree ≥ 99.99 %"
    assert tolerance_text({}) == "reported only"
