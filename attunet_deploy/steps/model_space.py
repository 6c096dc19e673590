"""What a model family's bundle looks like in model space: the divisor of every spatial axis, and
for 3D families (``layout`` NCDHW) the sliding window and the voxel spacing volumes are resampled
to, plus the synthetic golden volumes export judges the ONNX graph on when the user gave none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from attunet_deploy.bundle.spec import Normalization, SlidingWindow
from attunet_deploy.errors import InputError

#: The default window edge (voxels): MONAI's and nnU-Net's usual CT patch, rounded to the divisor.
DEFAULT_ROI_EDGE = 96

if TYPE_CHECKING:
    from attunet_deploy.segmenter import Segmenter


@dataclass(frozen=True)
class ModelSpace:
    divisors: tuple[int, ...]
    sliding_window: SlidingWindow | None = None
    spacing: tuple[float, float, float] | None = None

    @property
    def three_d(self) -> bool:
        return len(self.divisors) == 3

    @property
    def layout(self) -> str:
        return "NCDHW" if self.three_d else "NCHW"


def parse_triple(text: str, what: str, kind: type = int) -> tuple[Any, ...]:
    """``"96x96x96"`` -> (96, 96, 96); ``kind=float`` for spacings (``"2.5x0.8x0.8"``)."""
    parts = str(text).lower().replace("*", "x").replace(",", "x").split("x")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        axes, example = ("D x H x W", "96x96x96") if kind is int else ("Z x Y x X (mm)", "2.5x0.8x0.8")
        raise InputError(f"{what} {text!r}: three positive numbers {axes}, e.g. {example}")
    return values


def space_of(loaded: Any, *, roi: tuple[int, ...] | None = None, overlap: float = 0.5, sw_mode: str = "gaussian",
                spacing: tuple[float, ...] | None = None, batch: int = 1) -> ModelSpace:
    """Divisors (and for 3D the sliding window and spacing) of a loaded checkpoint's model."""
    from attunet_deploy.models.attunet2d import SPATIAL_DIVISOR

    divisors: tuple[int, ...] = tuple(getattr(loaded.config, "divisor", (SPATIAL_DIVISOR, SPATIAL_DIVISOR)))
    if len(divisors) != 3:
        if roi is not None or spacing is not None:
            raise InputError("--roi and --spacing are for 3D models (volumes); this checkpoint is a 2D "
                             f"{loaded.family} model")
        return ModelSpace(divisors)
    window = tuple(roi) if roi is not None else tuple(max(d, DEFAULT_ROI_EDGE - DEFAULT_ROI_EDGE % d)
                                                      for d in divisors)
    if any(r % d for r, d in zip(window, divisors)):
        raise InputError(f"--roi {'x'.join(map(str, window))}: each axis must be a multiple of the model's divisor "
                         f"{'x'.join(map(str, divisors))}")
    return ModelSpace(divisors, SlidingWindow(window, overlap=float(overlap), mode=sw_mode, batch=batch),
                      (float(spacing[0]), float(spacing[1]), float(spacing[2])) if spacing is not None else None)


def demo_volumes(segmenter: Segmenter) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """Golden cases of the 3D demo: 8 phantom volumes with labels, and 2 cropped to a size that is a
    multiple of no divisor."""
    from attunet_deploy.demo import GOLDEN_SEED
    from attunet_deploy.demo.phantom3d import make_volumes

    hu, labels = make_volumes(8, seed=GOLDEN_SEED)
    x = segmenter.normalize(hu)
    crop = (slice(None), slice(None), slice(0, 27), slice(3, 58), slice(2, 61))
    return [(x, labels, [f"phantom volume {k}" for k in range(8)]),
            (np.ascontiguousarray(x[:2][crop]), np.ascontiguousarray(labels[:2][crop[1:]]),
             [f"phantom volume {k} (27x55x59 crop)" for k in range(2)])]


def synthetic_volumes(in_channels: int, normalization: Normalization, divisors: tuple[int, ...]
                      ) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """Golden cases for a 3D model without user volumes: smooth random fields at two window-like
    sizes (multiples of the divisors) and one size that is a multiple of none of them."""
    rng = np.random.default_rng(20261127)
    base = [max(d, 16) for d in divisors]
    shapes = [(1, *(2 * b for b in base)), (2, base[0], 2 * base[1], 3 * base[2]),
              (1, *(2 * b - 3 if b > 2 else b + 1 for b in base))]
    cases: list[tuple[np.ndarray, np.ndarray | None, list[str]]] = []
    for i, (n, *size) in enumerate(shapes):
        coarse = rng.standard_normal((n, in_channels, *(s // 4 + 2 for s in size))).astype(np.float32)
        field = coarse.repeat(4, axis=2).repeat(4, axis=3).repeat(4, axis=4)[:, :, :size[0], :size[1], :size[2]]
        field = field + 0.3 * rng.standard_normal(field.shape).astype(np.float32)
        if normalization.unit_range:
            field = (1.0 / (1.0 + np.exp(-field))).astype(np.float32)  # as the normalised images: in [0, 1]
        label = "x".join(map(str, size))
        cases.append((np.ascontiguousarray(field, dtype=np.float32), None,
                      [f"synthetic volume {i}.{k} ({label})" for k in range(n)]))
    return cases
