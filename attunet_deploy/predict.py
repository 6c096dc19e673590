"""Segment image files with a bundle: masks (.npy, or .nii.gz keeping the affine) and overlays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .calibration import ImageRecord, list_image_files, read_file
from .console import Reporter
from .fileio import atomic_path
from .runtimes.base import load_runner


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".npy", ".npz", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".dcm",
                ".dicom", ".ima"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def overlay_png(image: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """First channel, min-max scaled to grey, with the mask's foreground tinted red (classes: hues)."""
    from PIL import Image

    g = image[0].astype(np.float64)
    lo, hi = np.percentile(g, 0.5), np.percentile(g, 99.5)
    grey = np.clip((g - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.stack([grey, grey, grey], axis=-1)
    palette = np.array([[1, 0, 0], [0, 1, 0], [0, 0.4, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float64)
    for c in np.unique(mask):
        if c == 0:
            continue
        sel = mask == c
        rgb[sel] = 0.55 * rgb[sel] + 0.45 * palette[(int(c) - 1) % len(palette)]
    with atomic_path(path) as tmp:
        Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp, format="PNG")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def _write_nifti(path: Path, masks: np.ndarray, records: list[ImageRecord]) -> None:
    import nibabel as nib

    vol = np.zeros(records[0].meta["nifti_shape"], dtype=np.uint8)
    for rec, m in zip(records, masks):
        vol[:, :, rec.index] = m
    img = nib.Nifti1Image(vol, records[0].meta["affine"])
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp) + ".nii.gz")  # nibabel picks the format from the suffix
        os.replace(str(tmp) + ".nii.gz", tmp)


def predict_files(bundle: Bundle, inputs: list[str], out: str | os.PathLike[str], backend: str = "auto",
                  precision: str = "fp32", overlay: bool = True, reporter: Reporter | None = None
                  ) -> list[dict[str, Any]]:
    """Segment every image in ``inputs`` (files or directories); returns one row per input file.

    Every input is read and validated before anything is written.
    """
    from .environment import has_module

    reporter = reporter or Reporter()
    files = [f for p in inputs for f in list_image_files(p)]
    per_file = [(f, read_file(f, bundle.in_channels)) for f in files]
    runner = load_runner(bundle, backend=backend, precision=precision)
    # Normalise (and check for NaN/Inf) everything up front so a bad file fails before any output.
    prepared = [(f, recs, [runner.preprocess(r.pixels) for r in recs]) for f, recs in per_file]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if overlay and not has_module("PIL"):
        reporter.info("overlays skipped: Pillow is not installed (pip install 'attunet-deploy[medical]')")
        overlay = False
    rows = []
    total = sum(len(r) for _, r, _ in prepared)
    with runner, reporter.progress(f"Segmenting on {runner.name}", total) as advance:
        for f, recs, xs in prepared:
            masks = []
            for x in xs:
                masks.append(runner.infer(x))
                advance()
            from .preprocess import logits_to_masks

            masks = [logits_to_masks(m, bundle.postprocessing)[0] for m in masks]
            stem = _stem(f)
            if "affine" in recs[0].meta:
                mask_path = out / f"{stem}_mask.nii.gz"
                _write_nifti(mask_path, np.stack(masks), recs)
            else:
                mask_path = out / f"{stem}_mask.npy"
                same = len({m.shape for m in masks}) == 1
                _write_npy(mask_path, np.stack(masks) if len(masks) > 1 and same else masks[0])
            if overlay:
                for i, (rec, m) in enumerate(zip(recs, masks)):
                    suffix = f"_{i}" if len(recs) > 1 else ""
                    overlay_png(rec.pixels, m, out / f"{stem}{suffix}_overlay.png")
            rows.append({"input": str(f), "shape": list(masks[0].shape) if len(masks) == 1
                         else [len(masks), *masks[0].shape], "foreground": int(sum(int((m > 0).sum()) for m in masks)),
                         "mask": str(mask_path), "backend": runner.name})
    return rows
