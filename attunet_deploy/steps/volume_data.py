"""The user's volumes in the export and quantize steps of a 3D bundle: the hold-out split (the same
path-hash rule as 2D images), golden volumes cropped to one window (in model space, at the
bundle's spacing), and roi-sized calibration patches from the other volumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.errors import InputError
from attunet_deploy.io.volumes import Volume, list_volumes, read_label_volume, read_volume, to_model_space
from attunet_deploy.segmenter import Segmenter

#: Calibration patches taken from one volume at most (its centre, then evenly spread positions).
PATCHES_PER_VOLUME = 4


@dataclass
class UserVolumes:
    """The user's volume set, split and its held-out volumes read, before any export work starts."""

    root: Path
    golden_files: list[Path]
    calib_files: list[Path]
    volumes: list[Volume]
    labels: list[np.ndarray] | None


def prepare_user_volumes(images: str | os.PathLike[str], labels: str | os.PathLike[str] | None, channels: int,
                         out_channels: int) -> UserVolumes:
    """Split ``images`` into golden and calibration volumes and read the golden ones (with labels).
    One volume alone is all golden (nothing is left to calibrate on)."""
    from attunet_deploy.io.holdout import split_holdout
    from attunet_deploy.io.labels import match_labels

    root = Path(images)
    files = list_volumes(root)
    label_map = match_labels(files, root, labels) if labels is not None else None
    golden, calib = (files, []) if len(files) == 1 else split_holdout(files, root)
    volumes = [read_volume(f, channels, root) for f in golden]
    masks = None
    if label_map is not None:
        masks = []
        for v in volumes:
            m = read_label_volume(label_map[v.source], out_channels)
            if m.shape != v.voxels.shape[1:]:
                raise InputError(f"label {label_map[v.source]} is {'x'.join(map(str, m.shape))}, volume {v.source} "
                                 f"is {'x'.join(map(str, v.voxels.shape[1:]))}: shapes must match")
            masks.append(m)
    return UserVolumes(root, golden, calib, volumes, masks)


def window_box(shape: tuple[int, ...], roi: Sequence[int], where: float = 0.5) -> tuple[slice, ...]:
    """A window of ``roi`` (or the whole axis where it is shorter) at relative position ``where``."""
    starts = [round((s - min(r, s)) * where) for s, r in zip(shape, roi)]
    return tuple(slice(a, a + min(r, s)) for a, s, r in zip(starts, shape, roi))


def golden_volume_cases(user: UserVolumes, segmenter: Segmenter
                        ) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """One case per held-out volume: its central window in model space (labels likewise)."""
    assert segmenter.spec.sliding_window is not None  # volumes are golden cases of 3D models only
    roi = segmenter.spec.sliding_window.roi
    cases: list[tuple[np.ndarray, np.ndarray | None, list[str]]] = []
    for i, v in enumerate(user.volumes):
        x = to_model_space(v, segmenter)
        box = window_box(x.shape[1:], roi)
        label = None
        if user.labels is not None:
            label = segmenter.labels_to(user.labels[i], x.shape[1:])[box][None]
        index = (slice(None), *box)
        cases.append((np.ascontiguousarray(x[index])[None], label, [v.rel]))
    return cases


def golden_volumes_manifest(user: UserVolumes, roi: list[int]) -> dict[str, Any]:
    """The manifest's ``golden`` record for held-out volumes (which files, and that a window of each is kept)."""
    from attunet_deploy.io.files import relative_name
    from attunet_deploy.io.volumes import volume_sha256

    source = [{"file": relative_name(v.source, user.root), "sha256": volume_sha256(v.source),
               "shape": list(v.voxels.shape), "spacing": list(v.spacing) if v.spacing else None,
               "window": list(roi)} for v in user.volumes]
    return {"kind": "user-volumes", "reference": "torch/fp32", "root": str(user.root.resolve()), "source": source,
            "synthetic_cases": 0, "labels": user.labels is not None, "calibration_candidates": len(user.calib_files)}


def calibration_patches(files: list[Path], segmenter: Segmenter, max_samples: int
                        ) -> tuple[list[np.ndarray], list[str]]:
    """Model-space [1, C, *roi] patches of ``files`` (centre first, then spread), at most ``max_samples``
    in all, and the files they came from."""
    assert segmenter.spec.sliding_window is not None  # calibration patches are windows of 3D models
    roi = segmenter.spec.sliding_window.roi
    per = max(1, min(PATCHES_PER_VOLUME, -(-max_samples // max(1, len(files)))))
    out: list[np.ndarray] = []
    used: list[str] = []
    for f in files:
        if len(out) >= max_samples:
            break
        x = to_model_space(read_volume(f, segmenter.channels), segmenter)
        for where in (0.5, 0.0, 1.0, 0.25)[:per]:
            index = (slice(None), *window_box(x.shape[1:], roi, where))
            patch = np.ascontiguousarray(x[index])[None]
            out.append(segmenter.pad(patch)[0])  # the graph takes multiples of its divisors
        used.append(f.name)
    return out[:max_samples], used
