"""Mask panels: one picture per judged image that shows where a backend's mask leaves the reference's.

A panel is four tiles side by side, all of the same crop and scale:

1. the input image in grey;
2. the reference's mask outlined over it (orange);
3. the backend's mask outlined over it (sky blue);
4. the difference map: foreground in both masks light grey (agree), only in the reference's
   orange (the backend missed it), only in the backend's sky blue (the backend added it).

Orange and sky blue are Paul Tol's colour-blind-safe pair: they stay apart for every common
colour-vision deficiency and in greyscale. Tiles are upscaled with nearest-neighbour (no
interpolated colours between labels) to at least :data:`MIN_TILE` pixels wide; an image larger
than that is cropped to the region where the masks differ (or to the reference's foreground when
they agree). A volume is shown by its worst axial slice. ``verify --save-diff`` writes these
panels as PNG files, ``report.html`` inlines them; both encode with :func:`encode_png` (zlib only,
no Pillow needed).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attunet_deploy.io.golden import GoldenCase
from attunet_deploy.judge.results import WorstImage
from attunet_deploy.segmenter import Segmenter

#: Tiles are at least this many pixels wide (and at most twice that, when cropped).
MIN_TILE = 384
#: The smallest crop of a large image (pixels of the image, per side).
MIN_CROP = 96
GAP = 6
REFERENCE_COLOUR = (238, 119, 51)  # Tol orange #EE7733: the reference's outline; missed pixels
BACKEND_COLOUR = (51, 187, 238)  # Tol cyan #33BBEE: the backend's outline; added pixels
AGREE_COLOUR = (221, 221, 221)  # light grey: foreground in both masks
TILE_TITLES = ("input", "reference outline", "backend outline", "difference")
LEGEND = ("tiles: input · reference's mask outlined (orange) · backend's mask outlined (sky blue) · "
          "difference: light grey = foreground in both (agree), orange = only in the reference's mask "
          "(the backend missed it), sky blue = only in the backend's mask (the backend added it)")


@dataclass(frozen=True)
class Panel:
    """One judged image (a volume's worst axial slice) with both masks, ready to render."""

    name: str  # the judged image's file (as the row's worst_images name it)
    dice: float
    image: np.ndarray  # [H, W] float
    reference: np.ndarray  # [H, W] labels of the reference
    output: np.ndarray  # [H, W] labels of the backend
    axial_slice: int | None = None  # which slice of a volume this is

    @property
    def label(self) -> str:
        return self.name if self.axial_slice is None else f"{self.name} (axial slice {self.axial_slice})"


def worst_slice(mask: np.ndarray, ref: np.ndarray) -> int:
    """The axial slice (first axis) where two label volumes differ in most voxels; where they agree
    everywhere, the slice with the most reference foreground."""
    differ = (mask != ref).reshape(len(mask), -1).sum(axis=1)
    if differ.max() > 0:
        return int(np.argmax(differ))
    return int(np.argmax((ref > 0).reshape(len(ref), -1).sum(axis=1)))


def collect_panels(worst_images: Sequence[WorstImage], outputs: list[np.ndarray], cases: list[GoldenCase],
                   segmenter: Segmenter) -> list[Panel]:
    """Panels of the listed worst images, in the order listed (the lowest Dice first)."""
    wanted = {w.file: float(w.dice) for w in worst_images}
    found: dict[str, Panel] = {}
    for out, case in zip(outputs, cases):
        names = case.image_names()
        if not wanted.keys() & set(names):
            continue
        masks = segmenter.masks(out)
        refs = segmenter.masks(case.logits)
        for i, name in enumerate(names):
            if name not in wanted or name in found:
                continue
            image, mask, ref, z = case.inputs[i, 0], masks[i], refs[i], None
            if mask.ndim == 3:  # a volume: its worst axial slice
                z = worst_slice(mask, ref)
                image, mask, ref = image[z], mask[z], ref[z]
            found[name] = Panel(name, wanted[name], np.asarray(image, np.float32).copy(), ref.copy(), mask.copy(), z)
    return [found[w.file] for w in worst_images if w.file in found]


def crop_box(panel: Panel) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the whole image when it is small, else the region that differs."""
    h, w = panel.image.shape
    if max(h, w) <= MIN_TILE:
        return 0, h, 0, w
    region = panel.output != panel.reference
    if not region.any():
        region = (panel.reference > 0) | (panel.output > 0)
    if not region.any():
        return 0, h, 0, w
    ys, xs = np.nonzero(region)
    side = max(MIN_CROP, int(ys.max() - ys.min()) + 32, int(xs.max() - xs.min()) + 32)
    y0, x0 = _centre(ys, side, h), _centre(xs, side, w)
    return y0, min(h, y0 + side), x0, min(w, x0 + side)


def _centre(idx: np.ndarray, side: int, size: int) -> int:
    mid = (int(idx.min()) + int(idx.max())) // 2
    return int(min(max(0, mid - side // 2), max(0, size - side)))


def _grey(image: np.ndarray) -> np.ndarray:
    g = image.astype(np.float64)
    finite = g[np.isfinite(g)]
    lo, hi = (np.percentile(finite, 0.5), np.percentile(finite, 99.5)) if finite.size else (0.0, 1.0)
    return np.clip((np.nan_to_num(g) - lo) / max(hi - lo, 1e-12), 0, 1)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Foreground pixels next to a pixel of another label, thickened by one pixel."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge &= labels > 0
    thick = edge.copy()
    thick[1:] |= edge[:-1]
    thick[:, 1:] |= edge[:, :-1]
    return thick


def _paint(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int], alpha: float = 1.0) -> None:
    rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, np.float64)


def render_panel(panel: Panel) -> np.ndarray:
    """uint8 [H, W, 3]: the four tiles side by side (see the module docstring)."""
    y0, y1, x0, x1 = crop_box(panel)
    grey = _grey(panel.image)[y0:y1, x0:x1]
    ref = np.asarray(panel.reference)[y0:y1, x0:x1]
    out = np.asarray(panel.output)[y0:y1, x0:x1]
    scale = max(1, math.ceil(MIN_TILE / max(grey.shape[1], 1)))
    up = np.ones((scale, scale), np.uint8)
    grey, ref, out = (np.kron(a, up) for a in (grey, ref.astype(np.int32), out.astype(np.int32)))
    base = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    tiles = [base.copy() for _ in range(4)]
    _paint(tiles[1], _outline(ref), REFERENCE_COLOUR)
    _paint(tiles[2], _outline(out), BACKEND_COLOUR)
    diff = tiles[3]
    diff *= 0.45  # the image dimmed, so that the three classes stand out
    _paint(diff, (ref > 0) & (out == ref), AGREE_COLOUR, 0.85)
    _paint(diff, (ref > 0) & (out != ref), REFERENCE_COLOUR)
    _paint(diff, (out > 0) & (ref == 0), BACKEND_COLOUR)
    h, w = grey.shape
    canvas = np.full((h, 4 * w + 3 * GAP, 3), 24.0)
    for k, tile in enumerate(tiles):
        canvas[:, k * (w + GAP): k * (w + GAP) + w] = tile
    return np.clip(canvas, 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] (or [H, W]) array. Rows are filtered with 'Up' where they
    repeat the row above (nearest-neighbour upscaling) and 'Sub' elsewhere: both leave runs of
    zeros that deflate packs tightly."""
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    flat = arr.reshape(h, w * c).astype(np.int16)
    sub = flat.copy()
    sub[:, c:] -= flat[:, :-c]
    up = flat.copy()
    up[1:] -= flat[:-1]
    same = np.zeros(h, bool)
    same[1:] = (flat[1:] == flat[:-1]).all(axis=1)
    rows = np.where(same[:, None], up, sub).astype(np.uint8)
    filt = np.where(same, 2, 1).astype(np.uint8)[:, None]
    raw = np.concatenate([filt, rows], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, level))
            + chunk(b"IEND", b""))
