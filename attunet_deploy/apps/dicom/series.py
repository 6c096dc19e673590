"""A CT series through a 2D model: an HU volume segmented slice batch by slice batch (grouping,
ordering and geometry live in :mod:`attunet_deploy.io.dicom_series`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def segment_volume(runner: Any, hu: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 masks [N, H, W] of an HU volume, ``batch`` slices per call (the runner normalises)."""
    channels = runner.channels
    out = []
    for s in range(0, len(hu), batch):
        x = hu[s:s + batch, None]
        if channels > 1:
            x = np.repeat(x, channels, axis=1)
        out.append(runner.segment(x))
    return np.concatenate(out).astype(np.uint8)
