"""Deterministic synthetic abdominal CT *volumes* (Hounsfield units, [D, H, W]) with labels: the 2D
phantom's anatomy extended along z. Body, fat rim, liver, spleen and kidneys are ellipsoids, spine
and aorta run through every slice, bowel gas comes in pockets, and the label is a small irregular
low-contrast *target* organ (a pancreas stand-in) spanning part of the slices. One integer seed
gives the same volume on every machine.
"""

from __future__ import annotations

import numpy as np

from attunet_deploy.demo.phantom import stack_samples

#: Demo volume size [D, H, W] and its voxel spacing (z, y, x) in mm.
DEMO3D_SIZE = (32, 64, 64)
DEMO3D_SPACING = (5.0, 6.0, 6.0)


def _ellipsoid(zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, c: tuple[float, float, float],
               r: tuple[float, float, float]) -> np.ndarray:
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0


def _smooth3(img: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 blur along each axis (partial-volume effect at organ borders)."""
    out = img
    for axis in range(3):
        p = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lo = np.take(p, range(0, out.shape[axis]), axis=axis)
        mid = np.take(p, range(1, out.shape[axis] + 1), axis=axis)
        hi = np.take(p, range(2, out.shape[axis] + 2), axis=axis)
        out = (lo + 2 * mid + hi) / 4.0
    return out


def make_volume(seed: int, size: tuple[int, int, int] = DEMO3D_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(hu float32 [D, H, W], label uint8 [D, H, W])`` for one seed; the label is never empty."""
    rng = np.random.default_rng(int(seed))
    d, h, w = size
    zz, yy, xx = np.meshgrid(np.linspace(0, 1, d, dtype=np.float32), np.linspace(0, 1, h, dtype=np.float32),
                             np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
    img = np.full(size, -1000.0, dtype=np.float32)
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    ry, rx = rng.uniform(0.32, 0.38), rng.uniform(0.40, 0.46)
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    img[body] = -100.0 + rng.normal(0, 10)
    inner = ((yy - cy) / (ry - 0.04)) ** 2 + ((xx - cx) / (rx - 0.04)) ** 2 <= 1.0
    img[inner] = 35.0 + rng.normal(0, 5)
    img[_ellipsoid(zz, yy, xx, (rng.uniform(0.3, 0.5), cy - 0.05, cx - 0.2), (0.5, 0.17, 0.14)) & inner] = 60.0
    img[_ellipsoid(zz, yy, xx, (rng.uniform(0.3, 0.6), cy - 0.08, cx + 0.27), (0.3, 0.08, 0.06)) & inner] = 50.0
    for side in (-1, 1):
        img[_ellipsoid(zz, yy, xx, (rng.uniform(0.4, 0.7), cy + 0.12, cx + side * 0.17), (0.3, 0.07, 0.045))] = 150.0
    img[((yy - cy - 0.2) / 0.06) ** 2 + ((xx - cx) / 0.06) ** 2 <= 1.0] = 700.0  # vertebra
    img[((yy - cy - 0.08) / 0.025) ** 2 + ((xx - cx - 0.03) / 0.025) ** 2 <= 1.0] = 180.0  # aorta
    for _ in range(rng.integers(2, 5)):
        c = (rng.uniform(0.1, 0.9), cy + rng.uniform(-0.22, -0.1), cx + rng.uniform(-0.05, 0.25))
        img[_ellipsoid(zz, yy, xx, c, (0.08, rng.uniform(0.015, 0.035), rng.uniform(0.015, 0.035))) & inner] = -800.0
    # The target: an elongated, bumpy ellipsoid in front of the spine over part of the slices.
    tz, ty, tx = rng.uniform(0.35, 0.65), cy + rng.uniform(-0.02, 0.06), cx + rng.uniform(-0.06, 0.1)
    bumps = 1.0 + 0.25 * np.sin(2 * np.pi * (xx * rng.uniform(2, 4) + rng.uniform(0, 1))) \
        * np.cos(2 * np.pi * (zz * rng.uniform(1, 3) + rng.uniform(0, 1)))
    target = _ellipsoid(zz, yy, xx, (tz, ty, tx), (rng.uniform(0.18, 0.28), rng.uniform(0.035, 0.05) * 1.0,
                                                    rng.uniform(0.08, 0.12)))
    target &= (((yy - ty) / 0.05) ** 2 <= bumps) & inner
    img[target] = 105.0 + rng.normal(0, 8)
    img = _smooth3(img).astype(np.float32)
    img += rng.normal(0, 18.0, size=img.shape).astype(np.float32)
    return img, target.astype(np.uint8)


def make_volumes(count: int, seed: int = 0, size: tuple[int, int, int] = DEMO3D_SIZE
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` volumes as ``(hu float32 [N, 1, D, H, W], labels uint8 [N, D, H, W])``."""
    return stack_samples(make_volume, count, seed, size)
