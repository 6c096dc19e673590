"""Connected components of label masks: keep each class's largest component, drop components below
a volume, and count them (the QA flag's "fragments" check).

``scipy.ndimage.label`` does the labelling: SciPy is a dependency every platform this project runs
on has wheels for (x86_64, aarch64/Jetson), it is maintained by the SciPy project, and it is fast
enough here (a 200x512x512 mask labels in well under a second). ``connected-components-3d`` is
faster still but adds a package for no measured need. Connectivity is the face neighbours (4 in 2D,
6 in 3D), SciPy's default structuring element and what MONAI's ``KeepLargestConnectedComponent``
uses by default (``connectivity=1``).

Called from the Segmenter only: post-processing is part of the model (recorded in the manifest's
``postprocessing``), applied identically in every path, so verification compares cleaned masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _label(binary: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    return labels, int(n)


def clean(mask: np.ndarray, classes: Sequence[int], keep_largest: Sequence[int],
          min_voxels: int | None = None) -> np.ndarray:
    """One image's or volume's labels with, for every class in ``keep_largest``, only its largest
    connected component kept, and (``min_voxels``) every component smaller than that removed.
    Removed voxels become background (0). Returns a new array; ``mask`` is not changed."""
    out = np.array(mask, copy=True)
    for c in classes:
        if c not in keep_largest and not min_voxels:
            continue
        binary = out == c
        if not binary.any():
            continue
        labels, n = _label(binary)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        keep = np.ones(n, dtype=bool)
        if c in keep_largest:
            keep &= np.arange(n) == int(np.argmax(sizes))  # ties: the first in scan order
        if min_voxels:
            keep &= sizes >= min_voxels
        drop = np.concatenate([[False], ~keep])[labels]
        out[drop] = 0
    return out


def count(mask: np.ndarray, classes: Sequence[int]) -> dict[int, int]:
    """Connected components of each class in one image or volume."""
    return {c: _label(mask == c)[1] for c in classes}
