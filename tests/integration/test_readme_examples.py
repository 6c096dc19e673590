"""The README's Python examples run as written, on the demo bundles, and print what their comments
say: a newcomer copies them first (issue 35)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_a_readme_python_example_runs_verbatim(index: int, demo_bundle: Path, demo3d_bundle: Path,
                                               tmp_path: Path) -> None:
    (tmp_path / "deploy").symlink_to(demo_bundle)  # the folder names the README's commands make
    (tmp_path / "deploy3d").symlink_to(demo3d_bundle)
    code = python_blocks()[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    promised = [p.strip() for p in re.findall(r"^print\(.*\)\s*#\s*(.+)$", code, flags=re.M)]
    assert promised, "each README example ends by printing what its comment says"
    assert proc.stdout.strip().splitlines()[-len(promised):] == promised
