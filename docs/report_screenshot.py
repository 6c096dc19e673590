"""Reproduce docs/report.png, the README's picture of the demo report.

    .venv/bin/attdeploy pipeline -o /tmp/demo          # writes /tmp/demo/report.html
    .venv/bin/python docs/report_screenshot.py /tmp/demo/report.html docs/report.png

Headless Chromium (Debian's ``chromium``) renders the page; the top of it (verdict, Dice chart)
and the first panel of the lowest-Dice row are kept, scaled to 1000 pixels wide and reduced to a
256-colour palette so the file stays small.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image


def main(page: str, out: str, width: int = 1000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", "--window-size=1760,2150", f"--screenshot={shot}",
                        Path(page).resolve().as_uri()], check=True, capture_output=True, timeout=120)
        with Image.open(shot) as im:
            im = im.convert("RGB")
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
            im.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    print(f"{out}: {Path(out).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
