"""Deterministic synthetic abdominal CT phantoms (2D slices in Hounsfield units) with labels.

Each slice has air, an elliptical body with a fat rim, liver, spleen, two kidneys, aorta,
a vertebra with its cortical ring, bowel gas, and a small irregular low-contrast *target*
organ (a pancreas stand-in) whose mask is the label. Everything derives from one integer
seed, so phantom ``k`` of a set is the same on every machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: CT window used to normalise demo images: level 40 HU, width 400 HU (soft-tissue window).
DEMO_WINDOW = (40.0, 400.0)
#: Default phantom size; any size works (coordinates are relative).
DEMO_SIZE = (128, 128)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
             angle: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return u * u + v * v <= 1.0


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float,
          rng: np.random.Generator, harmonics: int = 5, roughness: float = 0.28) -> np.ndarray:
    """An irregular star-shaped region: radius modulated by random low-order harmonics."""
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(yy - cy, xx - cx)
    edge = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        edge += (roughness / k) * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # Elongate like a pancreas: stretch along a random direction.
    stretch = rng.uniform(1.3, 2.0)
    phi = rng.uniform(-0.6, 0.6)
    along = np.abs(np.cos(theta - phi))
    edge *= 1.0 + (stretch - 1.0) * along**2
    return r <= radius * edge


def _smooth(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """Cheap separable [1, 2, 1]/4 blur (partial-volume effect at organ borders)."""
    out = img
    for _ in range(passes):
        p = np.pad(out, 1, mode="edge")
        out = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4.0
        p = np.pad(out, 1, mode="edge")
        out = (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4.0
    return out


def make_phantom(seed: int, size: tuple[int, int] = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image_hu float32 [H, W], label uint8 [H, W])`` for one seed.

    The label is non-empty for every seed: the target is placed inside the body.
    """
    rng = np.random.default_rng(int(seed))
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h  # relative coordinates so that any size gives the same anatomy
    xx /= w
    img = np.full((h, w), -1000.0, dtype=np.float32)

    cy, cx = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    ry, rx = rng.uniform(0.32, 0.38), rng.uniform(0.40, 0.46)
    body = _ellipse(yy, xx, cy, cx, ry, rx)
    img[body] = -100.0 + rng.normal(0, 10)  # subcutaneous fat
    inner = _ellipse(yy, xx, cy, cx, ry - 0.04, rx - 0.04)
    img[inner] = 35.0 + rng.normal(0, 5)  # muscle / soft tissue

    # Liver (patient's right = image left), spleen, kidneys.
    liver = _ellipse(yy, xx, cy - 0.05, cx - 0.2, 0.17, 0.14, rng.uniform(-0.4, 0.2)) & inner
    img[liver] = 60.0 + rng.normal(0, 5)
    spleen = _ellipse(yy, xx, cy - 0.08, cx + 0.27, 0.08, 0.06, rng.uniform(-0.5, 0.5)) & inner
    img[spleen] = 50.0 + rng.normal(0, 5)
    for side in (-1, 1):
        kid = _ellipse(yy, xx, cy + 0.12, cx + side * 0.17, 0.07, 0.045, side * 0.4)
        img[kid] = 150.0 + rng.normal(0, 10)  # contrast-enhanced cortex
    # Vertebra and aorta.
    vert = _ellipse(yy, xx, cy + 0.2, cx, 0.06, 0.06)
    img[vert] = 700.0
    img[_ellipse(yy, xx, cy + 0.2, cx, 0.035, 0.035)] = 250.0  # cancellous bone
    aorta = _ellipse(yy, xx, cy + 0.08, cx + 0.03, 0.025, 0.025)
    img[aorta] = 180.0 + rng.normal(0, 10)
    # Bowel gas pockets.
    for _ in range(rng.integers(1, 4)):
        gy, gx = cy + rng.uniform(-0.22, -0.1), cx + rng.uniform(-0.05, 0.25)
        img[_ellipse(yy, xx, gy, gx, rng.uniform(0.015, 0.035), rng.uniform(0.015, 0.035)) & inner] = -800.0

    # Target organ: irregular, in front of the aorta/spine, slightly brighter than muscle.
    ty = cy + rng.uniform(-0.02, 0.06)
    tx = cx + rng.uniform(-0.06, 0.12)
    target = _blob(yy, xx, ty, tx, rng.uniform(0.045, 0.07), rng) & inner & ~vert
    img[target] = 105.0 + rng.normal(0, 8)

    img = _smooth(img, passes=1)
    img += rng.normal(0, 18.0, size=img.shape).astype(np.float32)  # quantum noise
    return img.astype(np.float32), target.astype(np.uint8)


def make_phantoms(count: int, seed: int = 0, size: tuple[int, int] = DEMO_SIZE
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` phantoms as ``(images float32 [N, 1, H, W] in HU, labels uint8 [N, H, W])``.

    Phantom ``i`` uses seed ``seed * 1_000_003 + i`` so sets from different seeds do not overlap.
    """
    return stack_samples(make_phantom, count, seed, size)


def stack_samples(make: Any, count: int, seed: int, size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``count`` samples of ``make(seed, size) -> (hu, label)`` stacked as ``(images [N, 1, *size],
    labels [N, *size])``; sample ``i`` uses seed ``seed * 1_000_003 + i`` (sets from different seeds
    do not overlap). Shared by the 2D phantoms and the 3D volumes."""
    if count < 1:
        raise ValueError("count must be >= 1")
    images = np.empty((count, 1, *size), dtype=np.float32)
    labels = np.empty((count, *size), dtype=np.uint8)
    for i in range(count):
        images[i, 0], labels[i] = make(seed * 1_000_003 + i, size)
    return images, labels


def window(images_hu: np.ndarray, level: float = DEMO_WINDOW[0], width: float = DEMO_WINDOW[1]
           ) -> np.ndarray:
    """Map HU to [0, 1] with a CT window (what the demo bundle's preprocessing does)."""
    lo = level - width / 2.0
    return np.clip((images_hu - lo) / width, 0.0, 1.0).astype(np.float32)
