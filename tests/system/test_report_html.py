"""report.html as a person sees it: the demo's report rendered by a real browser (Debian's headless
Chromium), its screenshot checked for content and its DOM for the verdict and the mask panels."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from attunet_deploy.bundle import Bundle

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)


class _Page(HTMLParser):
    """The verdict table's rows and every <img> source, from the DOM the browser built."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str, str]] = []
        self.unavailable: list[tuple[str, str]] = []  # (backend, precision) from the collapsed list
        self.images: list[tuple[str, str]] = []
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "li" and "data-precisions" in a:
            self.unavailable += [(a.get("data-backend") or "", p) for p in (a["data-precisions"] or "").split(",")]
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "verdict" and "data-backend" in a:
            self.rows.append((a["data-backend"] or "", a.get("data-precision") or "", a.get("data-status") or ""))
        elif tag == "img":
            self.images.append((a.get("class") or "", a.get("src") or ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_demo_report_renders_in_a_real_browser(demo_bundle: Path, tmp_path: Path) -> None:
    """The pipeline's last step on the demo bundle writes report.json, report.md and report.html
    from the same rows; the page is self-contained; Chromium renders it (skipped without Chromium)."""
    from PIL import Image

    from attunet_deploy.apps.pipeline import judge_and_report
    from attunet_deploy.judge.panels import MIN_TILE

    b = tmp_path / "demo"
    shutil.copytree(demo_bundle, b)
    judge_and_report(Bundle.load(b), {"TensorRT": "not built here"}, bench_iterations=1)
    html_path, report = b / "report.html", json.loads((b / "report.json").read_text())
    ran = {(r["backend"], r["precision"]) for r in report["verification"] if r["status"] != "unavailable"}
    assert {("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8")} <= ran
    assert {(r["backend"], r["precision"]) for r in report["benchmarks"]} == ran
    md = (b / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len({ln.count("|") for ln in table[:6]}) == 1, table[:6]  # every markdown row has the header's columns
    html = html_path.read_text(encoding="utf-8")
    assert html_path.stat().st_size < 3 * 2**20  # "under a few MB" for the demo
    # self-contained: no URL in any src or href, and nothing to run
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", html, re.I)
    assert "<script" not in html.lower()
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run does)")

    shot = tmp_path / "shot.png"
    done = _chromium("--window-size=1700,2200", f"--screenshot={shot}", html_path.as_uri(), tmp=tmp_path)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = im.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20) or []
        non_white = sum(n for n, c in colours if sum(c) < 3 * 245)
    assert len(colours) > 100 and non_white > 0.05 * pixels.width * pixels.height, "the screenshot is blank"

    dom = _chromium("--dump-dom", html_path.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Page()
    page.feed(dom.stdout)
    expected = [(r["backend"], r["precision"], r["status"]) for r in report["verification"]
                if r["status"] != "unavailable"]
    assert sorted(page.rows) == sorted(expected)  # the verdict table holds every row that ran...
    gone = [(r["backend"], r["precision"]) for r in report["verification"] if r["status"] == "unavailable"]
    assert sorted(page.unavailable) == sorted(gone)  # ...and the collapsed list every one that could not
    assert report["warnings"] == []  # the demo's verification proves something

    # Laid out for a 1280 px window: nothing wider than the window, the latency chart near the top. The
    # report has no script; a copy for the test gets one that writes the measurements into the title.
    probe = b / "probe.html"
    probe.write_text(html.replace("</body>", "<script>var svg=document.querySelector('#latency-heading');"
                                  "document.title=JSON.stringify({w:document.documentElement.scrollWidth,"
                                  "lat:svg.getBoundingClientRect().top+window.scrollY});</script></body>"))
    measured = _chromium("--window-size=1280,900", "--virtual-time-budget=3000", "--dump-dom", probe.as_uri(),
                         tmp=tmp_path)
    title = re.search(r"<title>(\{.*?\})</title>", measured.stdout)
    assert title, measured.stdout[:500]
    layout = json.loads(title.group(1))
    assert layout["w"] <= 1280, layout  # no horizontal overflow at 1280 px
    assert layout["lat"] < 2500, layout  # the latency chart starts within the first 2,500 px

    panels = [src for cls, src in page.images if "panel" in cls]
    ran = [r for r in report["verification"] if r["status"] != "unavailable"]
    assert len(panels) == sum(len(r["worst_images"]) for r in ran) > 0
    for src in panels:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()  # decodes every pixel
            assert im.width >= MIN_TILE
    assert "Latency at" in dom.stdout and report["machine"]["cpu"]["cpu_model"] in dom.stdout
