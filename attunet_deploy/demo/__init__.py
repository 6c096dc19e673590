"""The bundled demos: a small 2D Attention U-Net trained on synthetic abdominal CT phantoms, and
the paper's 3D network trained on synthetic CT volumes.

``attunet_demo.pt`` is reproduced by ``python -m attunet_deploy.demo.train``, ``oktay3d_demo.pt``
by ``python -m attunet_deploy.demo.train3d`` (both in this project's checkpoint format). Their
preprocessing is a CT window (level 40, width 400).
"""

from __future__ import annotations

import os
from pathlib import Path

from attunet_deploy.demo.phantom import DEMO_SIZE, DEMO_WINDOW, make_phantom, make_phantoms, window

DEMO_WEIGHTS = Path(__file__).with_name("attunet_demo.pt")
DEMO3D_WEIGHTS = Path(__file__).with_name("oktay3d_demo.pt")
#: The 3D demo's sliding window: 2 x 2 windows in-plane over a demo volume, blended.
DEMO3D_ROI = (32, 48, 48)
#: Normalisation recorded in the demo bundle's manifest (parse_normalization syntax).
DEMO_NORMALIZE = f"ct-window:{DEMO_WINDOW[0]:g},{DEMO_WINDOW[1]:g}"
#: Seeds of the phantom sets: training, held-out Dice, golden set, calibration.
TRAIN_SEED, HELDOUT_SEED, GOLDEN_SEED, CALIB_SEED = 0, 1, 2, 3


def is_demo(path: str | os.PathLike[str] | None) -> bool:
    return path is None or Path(path).resolve() in (DEMO_WEIGHTS.resolve(), DEMO3D_WEIGHTS.resolve())


__all__ = ["CALIB_SEED", "DEMO3D_ROI", "DEMO3D_WEIGHTS", "DEMO_NORMALIZE", "DEMO_SIZE", "DEMO_WEIGHTS",
           "DEMO_WINDOW", "GOLDEN_SEED", "HELDOUT_SEED", "TRAIN_SEED", "is_demo", "make_phantom", "make_phantoms",
           "window"]
