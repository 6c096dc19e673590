"""``verify --images`` on a 3D bundle: the user's volumes (NIfTI, .npy, DICOM series folders), each
judged whole through the bundle's sliding window, against the reference backend run the same way.

Volumes are brought to model space (normalised, resampled to the bundle's spacing where both are
known); labels are resampled to it by nearest neighbour, so per-volume Dice and ``gt_dice`` are
measured on the grid the model sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from attunet_deploy import limits
from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.io.golden import GoldenCase
from attunet_deploy.io.volumes import list_volumes, read_label_volume, read_volume, to_model_space
from attunet_deploy.runtimes.select import open_runner
from attunet_deploy.segmenter import Segmenter

#: Volumes one ``verify --images`` judges at most (evenly spaced over the sorted list).
MAX_VERIFY_VOLUMES = 16


def volume_cases(bundle: Bundle, images: str | os.PathLike[str], labels: str | os.PathLike[str] | None,
                 reference: str, reporter: Reporter, max_volumes: int = MAX_VERIFY_VOLUMES) -> list[GoldenCase]:
    """One case per volume (whole, model space) with the reference's logits through the sliding window."""
    from attunet_deploy.io.labels import match_labels

    root = Path(images)
    files = list_volumes(root)
    label_map = match_labels(files, root, labels) if labels is not None else None
    if len(files) > max_volumes:
        idx = np.unique(np.linspace(0, len(files) - 1, max_volumes).round().astype(int))
        reporter.notice("note:", f"{len(files)} volumes; judging {len(idx)} evenly spaced ones")
        files = [files[i] for i in idx]
    cases: list[GoldenCase] = []
    segmenter = Segmenter(bundle.spec)
    held = 0
    with open_runner(bundle, reference, "fp32") as ref, reporter.progress(
            f"Reference outputs ({reference}/fp32, sliding window)", len(files)) as advance:
        for f in files:
            v = read_volume(f, bundle.in_channels, root)
            x = to_model_space(v, segmenter)
            y = None
            if label_map is not None:
                m = read_label_volume(label_map[f], bundle.out_channels)
                if m.shape != v.voxels.shape[1:]:
                    raise InputError(f"label {label_map[f]} is {'x'.join(map(str, m.shape))}, volume {f} is "
                                     f"{'x'.join(map(str, v.voxels.shape[1:]))}: shapes must match")
                y = segmenter.labels_to(m, x.shape[1:])[None]
            logits = ref.infer_volume(x[None])
            held += x.nbytes + logits.nbytes
            if held > limits.HELD_IMAGES.bytes():
                raise InputError(f"the volumes judged at once take {held / 2**20:,.0f} MB in model space, above the "
                                 f"{limits.HELD_IMAGES.what} limit of {limits.HELD_IMAGES.describe()}: give fewer "
                                 f"volumes, or set {limits.HELD_IMAGES.env} to raise it")
            cases.append(GoldenCase(x[None], logits, y, [v.rel], volume=True))
            advance()
    return cases
