"""The demo meets the scanner. The bundled demo model keeps its Dice on the
synthetic CT series at the sizes CT comes in, read back from DICOM exactly as the node and
``predict --dicom-seg`` read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

import pydicom

from attunet_deploy import load_runner
from attunet_deploy.apps.dicom.series import segment_slices
from attunet_deploy.demo.ctseries import write_ct_series
from attunet_deploy.io.dicom import decode_hu


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.mark.parametrize(("size", "slices"), [(128, 24), (256, 24), (512, 16)])
def test_demo_dice_on_synthetic_ct_series(demo_bundle: Path, tmp_path: Path, size: int, slices: int) -> None:
    series = write_ct_series(tmp_path / "ct", slices, (size, size))  # the writer's default series (seed 0)
    hu = np.stack([decode_hu(pydicom.dcmread(s.path), s.path) for s in series])
    with load_runner(demo_bundle, backend="ort") as runner:
        masks = segment_slices(runner, hu, batch=4)
    scores = [dice(m, s.label) for m, s in zip(masks, series)]
    assert np.mean(scores) >= 0.95, f"{size}x{size}: mean Dice {np.mean(scores):.3f} ({np.round(scores, 3)})"
