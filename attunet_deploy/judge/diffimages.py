"""``verify --save-diff``: where a backend's mask differs from the reference's, as PNG pictures.

One PNG per listed worst image of each backend/precision: the image in grey, pixels that are
foreground in both masks in green, only in the reference in blue, only in the backend in red.
A volume (3D bundles) is shown by its worst axial slice: the one where the masks differ most.
``report.md`` in the folder has the legend and a table of every picture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.fileio import atomic_path, write_text_atomic
from attunet_deploy.io.golden import GoldenCase
from attunet_deploy.preprocess import logits_to_masks

BOTH = (40, 200, 40)
REFERENCE_ONLY = (40, 110, 255)
BACKEND_ONLY = (240, 40, 40)
LEGEND = ("green: foreground in both masks (agree) · blue: only in the reference's mask (the backend missed it) · "
          "red: only in the backend's mask (the backend added it) · grey: background in both")


def diff_rgb(image: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: grey image with agreement / reference-only / backend-only colours."""
    g = image.astype(np.float64)
    lo, hi = np.percentile(g, 0.5), np.percentile(g, 99.5)
    grey = np.clip((g - lo) / max(hi - lo, 1e-12), 0, 1) * 0.8
    rgb = np.stack([grey, grey, grey], axis=-1) * 255.0
    both = (mask > 0) & (mask == ref)
    ref_only = (ref > 0) & (mask != ref)
    out_only = (mask > 0) & (ref == 0)
    for sel, colour in ((both, BOTH), (ref_only, REFERENCE_ONLY), (out_only, BACKEND_ONLY)):
        rgb[sel] = 0.35 * rgb[sel] + 0.65 * np.asarray(colour, np.float64)
    return rgb.astype(np.uint8)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def write_diff_images(folder: Path, row: Mapping[str, Any], outputs: list[np.ndarray], cases: list[GoldenCase],
                      postprocessing: dict[str, Any]) -> list[str]:
    """PNG per worst image of ``row``; returns their paths relative to ``folder``."""
    from PIL import Image

    wanted = {w["file"]: rank for rank, w in enumerate(row.get("worst_images", []), 1)}
    sub = folder / f"{row['backend']}-{row['precision']}"
    written = []
    for out, case in zip(outputs, cases):
        masks = logits_to_masks(out, postprocessing)
        refs = logits_to_masks(case.logits, postprocessing)
        for i, name in enumerate(case.image_names()):
            if name not in wanted:
                continue
            image, mask, ref, label = case.inputs[i, 0], masks[i], refs[i], _safe(name)
            if mask.ndim == 3:  # a volume: its worst axial slice
                z = worst_slice(mask, ref)
                image, mask, ref, label = image[z], mask[z], ref[z], f"{label}-z{z}"
            path = sub / f"{wanted[name]}-{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Image.fromarray(diff_rgb(image, mask, ref)).save(tmp, format="PNG")
            written.append(path.relative_to(folder).as_posix())
    return sorted(written)


def worst_slice(mask: np.ndarray, ref: np.ndarray) -> int:
    """The axial slice (first axis) where two label volumes differ in most voxels; where they agree
    everywhere, the slice with the most reference foreground."""
    differ = (mask != ref).reshape(len(mask), -1).sum(axis=1)
    if differ.max() > 0:
        return int(np.argmax(differ))
    return int(np.argmax((ref > 0).reshape(len(ref), -1).sum(axis=1)))


def write_diff_index(folder: Path, rows: Sequence[Mapping[str, Any]], reference: str) -> None:
    lines = [f"# Mask differences against {reference}", "", f"Legend: {LEGEND}.", "",
             "| backend | precision | image | Dice vs reference | picture |", "|---|---|---|---|---|"]
    for r in rows:
        pics = dict(zip([w["file"] for w in r.get("worst_images", [])], r.get("diff_images", [])))
        for w in r.get("worst_images", []):
            pic = pics.get(w["file"], "")
            lines.append(f"| {r['backend']} | {r['precision']} | {w['file'].replace('|', '/')} | {w['dice']:.4f} | "
                         + (f"![]({pic})" if pic else "-") + " |")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
