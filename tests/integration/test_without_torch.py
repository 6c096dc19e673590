"""The runtime side works on a device without torch (import blocked in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCK_TORCH = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _NoTorch())
'''


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=300)


def test_verify_and_segment_without_torch(small_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    proc = _run(f'''
import json, numpy as np
from attunet_deploy.cli import main
try:
    main(["verify", "-b", {str(small_bundle)!r}, "--backend", "all", "--json", {str(out)!r}])
except SystemExit as e:
    code = e.code
from attunet_deploy import load_runner
with load_runner({str(small_bundle)!r}, backend="auto") as r:
    masks = r.segment(np.random.default_rng(0).random((1, 1, 70, 90), dtype=np.float32))
print(json.dumps({{"code": code, "shape": list(masks.shape), "backend": r.backend,
                  "torch_loaded": "torch" in sys.modules}}))
''')
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "shape": [1, 70, 90], "backend": "ort", "torch_loaded": False}
    rows = {(r["backend"], r["precision"]): r for r in json.loads(out.read_text())["results"]}
    assert rows[("ort", "fp32")]["status"] == "pass"
    assert rows[("torch", "fp32")]["status"] == "unavailable" and "torch is not installed" in rows[("torch", "fp32")][
        "reason"]


def test_export_without_torch_says_what_to_install(tmp_path: Path) -> None:
    proc = _run(f'''
from attunet_deploy.cli import main
main(["export", "-o", {str(tmp_path / "b")!r}])
''')
    assert proc.returncode == 2
    assert "needs torch: pip install 'attunet-deploy[torch]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_unit_lane_runs_without_torch() -> None:
    """tests/unit is numpy-only: it passes in a process where importing torch fails."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH + f"""
import pytest
rc = pytest.main(["-q", "-p", "no:cacheprovider", {str(root / "tests" / "unit")!r}])
assert "torch" not in sys.modules, "a unit test imported torch"
sys.exit(rc)
"""], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout

