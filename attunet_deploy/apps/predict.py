"""Segment image files with a bundle: masks (.npy, or .nii.gz keeping the affine) and overlays."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import StagingDir, fsync_file
from attunet_deploy.io.arrays import ImageRecord
from attunet_deploy.io.files import NIFTI_EXT, list_image_files, suffix_of
from attunet_deploy.io.images import read_file
from attunet_deploy.loader import load_runner
from attunet_deploy.runtimes.base import Runner


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".npy", ".npz", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".dcm",
                ".dicom", ".ima"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def overlay_png(image: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """First channel, min-max scaled to grey, with the mask's foreground tinted red (classes: hues);
    written to ``path`` and fsynced (predict stages it, then renames it into place)."""
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
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path, format="PNG")
    fsync_file(path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())


def _save_nifti(path: Path, masks: np.ndarray, records: list[ImageRecord]) -> None:
    """``path`` ends in .nii.gz (nibabel picks the format from the suffix)."""
    import nibabel as nib

    vol = np.zeros(records[0].meta["nifti_shape"], dtype=np.uint8)
    for rec, m in zip(records, masks):
        vol[:, :, rec.index] = m
    nib.save(nib.Nifti1Image(vol, records[0].meta["affine"]), str(path))
    fsync_file(path)


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
    for _, names in plan.values():
        for n in names:
            if (out / n).is_dir():  # --overwrite replaces files, never a folder: refused before the first commit
                raise InputError(f"{out / n} is a directory: an output cannot replace it; choose another -o")
            if not overwrite and os.path.lexists(out / n):
                raise InputError(f"{out / n} exists: choose another -o, or pass --overwrite to replace it")
    return plan


def _expected_masks_free(files: list[Path], out: Path) -> None:
    """Refuse, before any inference, a mask file that exists already under the name its input will
    surely get (the stem alone decides it; ``plan_outputs`` checks every name again once all inputs
    are read)."""
    for f, stem in output_names(files).items():
        name = f"{stem}_mask.nii.gz" if suffix_of(f) in NIFTI_EXT else f"{stem}_mask.npy"
        if os.path.lexists(out / name):
            raise InputError(f"{out / name} exists: choose another -o, or pass --overwrite to replace it")


@dataclass(frozen=True)
class PredictRow:
    """One input file's result: its mask file, the masks' shape and foreground pixels, the runner."""

    input: str
    shape: tuple[int, ...]
    foreground: int
    mask: str
    backend: str

    def to_dict(self) -> dict[str, object]:
        return {"input": self.input, "shape": list(self.shape), "foreground": self.foreground, "mask": self.mask,
                "backend": self.backend}


def predict_files(bundle: Bundle, inputs: list[str], out: str | os.PathLike[str], backend: str = "auto",
                  precision: str = "fp32", overlay: bool = True, overwrite: bool = False,
                  reporter: Reporter | None = None, **runner_options: Any) -> list[PredictRow]:
    """Segment every image in ``inputs`` (files or directories); returns one row per input file.

    Files are read while earlier slices are segmented (one stream through ``Runner.infer_many``), and
    a file's outputs are written, under a hidden folder in ``out``, as soon as its last slice is: I/O
    overlaps inference, and neither every input nor every mask is held at once. The outputs get
    their names only after every input has been read and validated and every name decided; a
    failure leaves ``out`` as it was.
    """
    bundle.require_2d("predict")
    from attunet_deploy.environment import has_module

    reporter = reporter or Reporter()
    seen: set[Path] = set()
    files = []
    for p in inputs:
        for f in list_image_files(Path(p)):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    runner = load_runner(bundle, backend=backend, precision=precision, **runner_options)
    if overlay and not has_module("PIL"):
        reporter.info("overlays skipped: Pillow is not installed (pip install 'attunet-deploy[medical]')")
        overlay = False
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a directory")
    if not overwrite:
        _expected_masks_free(files, out)
    stream = _SliceStream(files, runner, overlay)
    staging = StagingDir(out)
    try:
        staged = _segment_and_stage(runner, stream, staging, overlay, reporter)
        plan = plan_outputs(stream.per_file, out, overlay, overwrite)
        staging.commit([(src, out / name) for (f, _), (srcs, _) in zip(stream.per_file, staged)
                        for src, name in zip(srcs, plan[f][1])])
    finally:
        staging.discard()
    return [PredictRow(str(f), shape, foreground, str(out / plan[f][1][0]), runner.name)
            for (f, _), (_, (shape, foreground)) in zip(stream.per_file, staged)]


class _SliceStream:
    """Model-space slices of ``files`` in order, each file read (and validated) when the stream
    reaches it; ``per_file`` and ``ends`` (slices up to the end of each file) grow as it goes."""

    def __init__(self, files: list[Path], runner: Runner, overlay: bool) -> None:
        self.files, self.runner, self.overlay = files, runner, overlay
        self.per_file: list[tuple[Path, list[ImageRecord]]] = []
        self.ends: list[int] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        """Raw images, one [1, C, H, W] batch each, validated before any is yielded (a bad file is
        named before its first slice reaches the runner)."""
        for f in self.files:
            recs = read_file(f, self.runner.channels)
            try:
                xs = [self.runner.segmenter.as_batch(r.pixels) for r in recs]  # shape, NaN/Inf
            except InputError as exc:
                raise InputError(f"{f}: {exc}") from None
            if not self.overlay:  # the pixels are needed again only for the overlays
                recs = [dataclasses.replace(r, pixels=np.empty(0, np.float32)) for r in recs]
            self.per_file.append((f, recs))
            self.ends.append((self.ends[-1] if self.ends else 0) + len(xs))
            yield from xs


def _segment_and_stage(runner: Runner, stream: _SliceStream, staging: StagingDir, overlay: bool,
                       reporter: Reporter) -> list[tuple[list[Path], tuple[tuple[int, ...], int]]]:
    """Segment the stream; stage each file's outputs once its slices are done. Per file: the staged
    paths (mask first, then overlays, as ``plan_outputs`` names them) and its row's figures."""
    n = len(stream.files)
    staged: list[tuple[list[Path], tuple[tuple[int, ...], int]]] = []
    masks: list[np.ndarray] = []  # of the files not staged yet
    done_slices = 0
    with runner, reporter.progress(f"Segmenting {n} file{'s' * (n != 1)} on {runner.name}", n) as advance:
        # One stream of every slice: a backend with parallel requests (OpenVINO) keeps several in flight.
        for batch_masks in runner.segment_many(stream):
            masks.append(batch_masks[0])
            while len(staged) < len(stream.ends) and stream.ends[len(staged)] <= done_slices + len(masks):
                k = len(staged)
                count = stream.ends[k] - done_slices
                staged.append(_stage_file(staging, k, stream.per_file[k][1], masks[:count], overlay))
                del masks[:count]
                done_slices += count
                advance()
    return staged


def _stage_file(staging: StagingDir, k: int, recs: list[ImageRecord], masks: list[np.ndarray],
                overlay: bool) -> tuple[list[Path], tuple[tuple[int, ...], int]]:
    """Write the ``k``-th file's mask file (and overlays) into the staging folder."""
    nifti = "affine" in recs[0].meta
    mask_path = staging.path(f"{k}_mask{'.nii.gz' if nifti else '.npy'}")
    if nifti:
        _save_nifti(mask_path, np.stack(masks), recs)
    else:
        same = len({m.shape for m in masks}) == 1
        _save_npy(mask_path, np.stack(masks) if len(masks) > 1 and same else masks[0])
    paths = [mask_path]
    if overlay:
        for j, (rec, m) in enumerate(zip(recs, masks)):
            paths.append(staging.path(f"{k}_{j}_overlay.png"))
            overlay_png(rec.pixels, m, paths[-1])
    shape = tuple(masks[0].shape) if len(masks) == 1 else (len(masks), *masks[0].shape)
    return paths, (shape, int(sum(int((m > 0).sum()) for m in masks)))
