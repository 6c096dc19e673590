"""Segment image files with a bundle: masks (.npy, or .nii.gz keeping the affine) and overlays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import atomic_path
from attunet_deploy.io.arrays import ImageRecord
from attunet_deploy.io.files import list_image_files, suffix_of
from attunet_deploy.io.images import read_file
from attunet_deploy.preprocess import pad_to_divisor
from attunet_deploy.runtimes.select import load_runner


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


def output_names(files: list[Path]) -> dict[Path, str]:
    """A distinct output stem for every input file.

    The file's own stem where it is unique; where two inputs share one (``a/scan.npy`` and
    ``b/scan.npy``) their paths relative to the inputs' common folder are kept (``a/scan``,
    ``b/scan``); files that differ only by extension keep it (``scan_npy``, ``scan_png``).
    """
    def dedupe(stems: dict[Path, str], fix: Any) -> dict[Path, str]:
        counts: dict[str, int] = {}
        for st in stems.values():
            counts[st] = counts.get(st, 0) + 1
        return {f: fix(f, st) if counts[st] > 1 else st for f, st in stems.items()}

    resolved = {f: f.resolve() for f in files}
    common = Path(os.path.commonpath([str(r.parent) for r in resolved.values()])) if files else Path(".")

    def relative(f: Path, st: str) -> str:
        rel = resolved[f].relative_to(common)
        return (rel.parent / _stem(rel)).as_posix() if str(rel.parent) != "." else _stem(rel)

    stems = dedupe({f: _stem(f) for f in files}, relative)
    stems = dedupe(stems, lambda f, st: f"{st}_{suffix_of(f).lstrip('.').replace('.', '_') or 'file'}")
    return {f: _fit(st) for f, st in stems.items()}


#: Bytes of an output stem's last component: room for "_12345_overlay.png" and the temp-file prefix
#: under the 255-byte file-name limit.
STEM_MAX = 200


def _fit(stem: str) -> str:
    """``stem`` with every component within STEM_MAX bytes: a long one keeps its start and gains a
    digest of the whole, so two long names still give two outputs."""
    import hashlib

    parts = []
    for part in stem.split("/"):
        raw = part.encode("utf-8", "surrogateescape")
        if len(raw) > STEM_MAX:
            digest = hashlib.sha256(raw).hexdigest()[:12]
            part = raw[:STEM_MAX - 13].decode("utf-8", "ignore") + "~" + digest
        parts.append(part)
    return "/".join(parts)


def _outputs_for(stem: str, records: list[ImageRecord], overlay: bool) -> list[str]:
    mask = f"{stem}_mask.nii.gz" if "affine" in records[0].meta else f"{stem}_mask.npy"
    outs = [mask]
    if overlay:
        outs += [f"{stem}{f'_{i}' if len(records) > 1 else ''}_overlay.png" for i in range(len(records))]
    return outs


def plan_outputs(per_file: list[tuple[Path, list[ImageRecord]]], out: Path, overlay: bool,
                 overwrite: bool) -> dict[Path, tuple[str, list[str]]]:
    """file -> (stem, output names): all distinct, and (without ``overwrite``) none existing yet."""
    stems = output_names([f for f, _ in per_file])
    taken: set[str] = set()
    plan: dict[Path, tuple[str, list[str]]] = {}
    for f, recs in per_file:
        stem, k = stems[f], 1
        names = _outputs_for(stem, recs, overlay)
        while any(n in taken for n in names):  # e.g. x_0.png's overlay vs x.npy's first slice
            k += 1
            stem = f"{stems[f]}_{k}"
            names = _outputs_for(stem, recs, overlay)
        taken.update(names)
        plan[f] = (stem, names)
    if not overwrite:
        for _, names in plan.values():
            for n in names:
                if os.path.lexists(out / n):
                    raise InputError(f"{out / n} exists: choose another -o, or pass --overwrite to replace it")
    return plan


def predict_files(bundle: Bundle, inputs: list[str], out: str | os.PathLike[str], backend: str = "auto",
                  precision: str = "fp32", overlay: bool = True, overwrite: bool = False,
                  reporter: Reporter | None = None, **runner_options: Any) -> list[dict[str, Any]]:
    """Segment every image in ``inputs`` (files or directories); returns one row per input file.

    Every input is read and validated, and every output name decided, before anything is written.
    """
    bundle.require_2d("predict")
    from attunet_deploy.environment import has_module
    from attunet_deploy.preprocess import logits_to_masks

    reporter = reporter or Reporter()
    seen: set[Path] = set()
    files = []
    for p in inputs:
        root = Path(p)
        for f in list_image_files(root):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    per_file = [(f, read_file(f, bundle.in_channels)) for f in files]
    runner = load_runner(bundle, backend=backend, precision=precision, **runner_options)
    # Normalise (and check for NaN/Inf and size) everything up front so a bad file fails before any output.
    prepared = []
    for f, recs in per_file:
        xs = [runner.preprocess(r.pixels) for r in recs]
        for x in xs:
            runner.check_memory(pad_to_divisor(x, bundle.divisor)[0].shape)
        prepared.append((f, recs, xs))
    if overlay and not has_module("PIL"):
        reporter.info("overlays skipped: Pillow is not installed (pip install 'attunet-deploy[medical]')")
        overlay = False
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a directory")
    plan = plan_outputs(per_file, out, overlay, overwrite)
    rows = []
    total = sum(len(r) for _, r, _ in prepared)
    with runner, reporter.progress(f"Segmenting on {runner.name}", total) as advance:
        results = []
        # One stream of every slice: a backend with parallel requests (OpenVINO) keeps several in flight.
        logits = runner.infer_many(x for _, _, xs in prepared for x in xs)
        for f, recs, xs in prepared:
            masks = []
            for _ in xs:
                masks.append(logits_to_masks(next(logits), bundle.postprocessing)[0])
                advance()
            results.append((f, recs, masks))
    out.mkdir(parents=True, exist_ok=True)
    for f, recs, masks in results:
        _, names = plan[f]
        mask_path = out / names[0]
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        if "affine" in recs[0].meta:
            _write_nifti(mask_path, np.stack(masks), recs)
        else:
            same = len({m.shape for m in masks}) == 1
            _write_npy(mask_path, np.stack(masks) if len(masks) > 1 and same else masks[0])
        if overlay:
            for rec, m, name in zip(recs, masks, names[1:]):
                overlay_png(rec.pixels, m, out / name)
        rows.append({"input": str(f), "shape": list(masks[0].shape) if len(masks) == 1
                     else [len(masks), *masks[0].shape], "foreground": int(sum(int((m > 0).sum()) for m in masks)),
                     "mask": str(mask_path), "backend": runner.name})
    return rows
