"""A newcomer's first hour (issue 35): verification that warns when it proves nothing, tables that
never split a number at 80 or 120 columns, and a CT series to try the DICOM commands with.
(The README's Python examples: test_readme_examples.py; pipeline --demo 3d beside the 2D demo:
test_demo_3d.py; the node's operator log: tests/system/test_dicom_node_crafted_input.py; the
report's layout: tests/system/test_report_html.py.)
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from attunet_deploy.cli import main


# ------------------------------------------------------------------ degenerate verification
def test_a_model_whose_reference_masks_are_all_foreground_is_flagged(tmp_path: Path) -> None:
    """A model that says "foreground" everywhere agrees with itself on every backend: every row passes
    with Dice 1.0. The pipeline says that proves little, and the report shows it."""
    import torch
    from popular import popular_state_dict

    sd = popular_state_dict(1, 1, 8, head="Conv_1x1", seed=3)
    sd["Conv_1x1.bias"] = torch.full_like(sd["Conv_1x1.bias"], 60.0)  # sigmoid(logit) = 1 at every pixel
    ckpt = tmp_path / "full.pth"
    torch.save(sd, ckpt)
    r = CliRunner().invoke(main, ["pipeline", str(ckpt), "-o", str(tmp_path / "b"), "--bench-iterations", "1"])
    assert r.exit_code == 0, r.output[-2000:]
    assert "warning: the reference's masks are empty or full on" in r.output
    assert "warning: the golden set is synthetic" in r.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert len(report["warnings"]) == 2
    html = (tmp_path / "b" / "report.html").read_text()
    assert 'id="warnings"' in html and "proves little" in html
    assert "## Warnings" in (tmp_path / "b" / "report.md").read_text()


def test_the_demo_verification_warns_of_nothing(demo_bundle: Path) -> None:
    r = CliRunner().invoke(main, ["verify", "-b", str(demo_bundle), "--backend", "ort", "--json", "-"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == [] and "warning:" not in r.output


# ------------------------------------------------------------------ tables at 80 and 120 columns
def _numbers(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])[-+]?\d[\d,]*\.\d+(?:e[-+]?\d+)?(?![\w.])|\d+x\d+(?:x\d+)*"
                          r"|(?<![\w.])\d{3,}(?![\w.])", text))


@pytest.mark.parametrize("width", [80, 120])
def test_no_table_splits_a_number_at_80_or_120_columns(demo_bundle: Path, width: int) -> None:
    from rich.console import Console

    from attunet_deploy.bundle import Bundle
    from attunet_deploy.cli import render
    from attunet_deploy.judge.bench import BenchSettings, bench_many
    from attunet_deploy.judge.report import bench_table, verify_table
    from attunet_deploy.judge.verify import verify

    bundle = Bundle.load(demo_bundle)
    rows = verify(bundle, ["ort"], ["all"])
    results, _ = bench_many(bundle, ["ort"], ["fp32", "int8"], BenchSettings(shape=(1, 1, 64, 64), warmup=1,
                                                                                  iterations=3))
    wide = Console(width=400, file=io.StringIO(), record=True)
    narrow = Console(width=width, file=io.StringIO(), record=True)
    for table in (verify_table(rows), bench_table(results)):
        wide.print(table)
        narrow.print(table)
    from attunet_deploy.apps.dicom.files import SegRow
    from attunet_deploy.apps.predict import PredictRow
    from attunet_deploy.qa import QaResult

    deep = "/data/site/projects/pancreas-2026/incoming/ct_series_0001/slices"
    masks = [PredictRow(f"{deep}/slice_{k:04d}.npy", (1, 512, 512), 12345 + k, f"out/slice_{k:04d}_mask.npy",
                        "ov/int8") for k in range(3)]
    segs = [SegRow("1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345", 120, 37,
                   "out/SEG_1.2.826.dcm", "ort/fp32", QaResult.of(["slice thickness 10 mm is outside 2.5 mm"]),
                   ("a", "b"))]

    def show() -> None:
        render.print_bundle_summary(bundle)
        render.print_bundle_state(bundle)
        render.print_masks(masks, "out")
        render.print_segs(segs, "out")

    render_out = io.StringIO()
    render.stdout = lambda: Console(width=width, file=render_out, record=True)  # type: ignore[assignment]
    wide_info = io.StringIO()
    try:
        show()
        info_narrow = render_out.getvalue()
        render.stdout = lambda: Console(width=400, file=wide_info)  # type: ignore[assignment]
        show()
    finally:
        import importlib

        importlib.reload(render)
    expected = _numbers(wide.export_text()) | _numbers(wide_info.getvalue())
    got = narrow.export_text() + info_narrow
    assert expected, "no numbers rendered"
    missing = sorted(n for n in expected if n not in got)
    assert not missing, f"split or cut at {width} columns: {missing[:10]}"
    assert max(len(line) for line in got.splitlines()) <= width


# ------------------------------------------------------------------ a CT series to try things with
def test_demo_series_writes_a_valid_series_that_predict_segments(demo_bundle: Path, tmp_path: Path) -> None:
    from dicomnet import dciodvfy_errors, need_tools

    need_tools("dciodvfy")
    r = CliRunner().invoke(main, ["demo-series", "-o", str(tmp_path / "ct"), "--slices", "4", "--size", "96"])
    assert r.exit_code == 0 and "wrote 4 slices of 96x96" in r.output, r.output
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == 4 and dciodvfy_errors(files[0]) == []
    again = CliRunner().invoke(main, ["demo-series", "-o", str(tmp_path / "ct")])
    assert again.exit_code == 2 and "new or empty" in again.output  # nothing overwritten
    p = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(tmp_path / "ct"), "--dicom-seg", "-o",
                                  str(tmp_path / "segs"), "--json", "-", "--backend", "ort"])
    assert p.exit_code == 0, p.output
    (row,) = json.loads(p.stdout[p.stdout.index("{"):])["series"]
    assert row["slices"] == 4 and Path(row["seg"]).is_file()

