"""A runner checks itself before its first answer.

A run-time cache (an OpenVINO blob, an ONNX Runtime TensorRT-EP engine) or an artifact changed on
disk after verification can make a backend return wrong masks without an error. So every runner,
once activated, runs the bundle's self-check input (``selfcheck.npz``, written by export: one
golden image for a 2D model, one window of a golden volume for a 3D one, with the PyTorch FP32
logits of it) and compares its logits with the stored ones within the precision's bounds below.
A miss refuses the runner with one line naming what to delete or re-export. Bundles exported before
the self-check existed use the golden set's first 2D image; 3D ones without the file skip it.

``verify``, ``bench`` and ``--precision best`` judge a backend themselves and turn it off
(``self_check=False``); ``ATTDEPLOY_SELF_CHECK=0`` turns it off everywhere (not recommended).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attunet_deploy.bundle import GOLDEN_FILE, SELFCHECK_FILE, Bundle
from attunet_deploy.errors import BackendUnavailable, ExitStatus, InputError

#: Per precision: the largest relative L2 distance of the logits (None: not checked) and the least
#: share of pixels whose class agrees. Looser than verification's tolerances (one image, any
#: backend's rounding), far tighter than a corrupted cache (rel L2 in the hundreds, Dice 0).
BOUNDS: dict[str, tuple[float | None, float]] = {"fp32": (1e-3, 0.999), "fp16": (5e-2, 0.99), "int8": (None, 0.95)}


#: One image or one window with its logits: a 256^3 window of 2 classes is 384 MB; anything larger is not ours.
SELFCHECK_MAX_BYTES = 512 << 20


class SelfCheckFailed(BackendUnavailable):
    """A runner's output on the stored input is not the stored reference's (exit 1, as a failed
    verification: the backend runs, but not the verified model)."""

    exit_code = ExitStatus.VERIFICATION_FAILED


@dataclass(frozen=True)
class SelfCheckInput:
    inputs: np.ndarray  # model space [1, C, *spatial]
    logits: np.ndarray  # PyTorch FP32 [1, K, *spatial]
    source: str


def enabled(options: dict[str, object]) -> bool:
    return bool(options.get("self_check", True)) and os.environ.get("ATTDEPLOY_SELF_CHECK", "1") != "0"


def save_selfcheck(fh: io.BufferedWriter | io.BytesIO, inputs: np.ndarray, logits: np.ndarray) -> None:
    np.savez(fh, inputs=np.ascontiguousarray(inputs, np.float32), logits=np.ascontiguousarray(logits, np.float32))


def load_selfcheck(bundle: Bundle) -> SelfCheckInput | None:
    """The bundle's self-check input: selfcheck.npz (hash-checked), else the first golden 2D image."""
    entry = bundle.artifact(SELFCHECK_FILE)
    if entry is not None:
        if entry.bytes > SELFCHECK_MAX_BYTES:
            raise InputError(f"{bundle.path(SELFCHECK_FILE)} is {entry.bytes:,} bytes: not a self-check input; "
                             "re-export the bundle")
        data = bundle.read_artifact(SELFCHECK_FILE)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, y = np.asarray(z["inputs"], np.float32), np.asarray(z["logits"], np.float32)
        if x.ndim != y.ndim or x.shape[0] != 1 or y.shape[2:] != x.shape[2:]:
            raise InputError(f"{bundle.root / SELFCHECK_FILE}: inputs {x.shape} and logits {y.shape} do not match: "
                             "re-export the bundle")
        return SelfCheckInput(x, y, SELFCHECK_FILE)
    if bundle.spatial_dims != 2 or bundle.artifact(GOLDEN_FILE) is None:
        return None
    from attunet_deploy.io.golden import load_golden

    cases = load_golden(bundle)
    if not cases or cases[0].volume:
        return None
    return SelfCheckInput(cases[0].inputs[:1], cases[0].logits[:1], f"{GOLDEN_FILE} (first image)")


def compare(precision: str, y: np.ndarray, ref: np.ndarray, masks: Sequence[np.ndarray]) -> str | None:
    """Why ``y`` misses the reference (None when it is within the precision's bounds)."""
    max_rel, min_agree = BOUNDS[precision]
    if y.shape != ref.shape or not np.all(np.isfinite(y)):
        return f"output {tuple(y.shape)} with {int(np.size(y) - np.isfinite(y).sum())} non-finite values"
    rel = float(np.linalg.norm((y - ref).ravel()) / max(float(np.linalg.norm(ref.ravel())), 1e-12))
    agree = float(np.mean(masks[0] == masks[1]))
    if max_rel is not None and rel > max_rel:
        return f"rel L2 {rel:.3g} > {max_rel:g} (pixel agreement {agree:.4f})"
    if agree < min_agree:
        return f"pixel agreement {agree:.4f} < {min_agree:g} (rel L2 {rel:.3g})"
    return None
