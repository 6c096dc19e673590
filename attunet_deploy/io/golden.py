"""The golden set: the images every backend is judged on, with the reference logits (and labels).

``golden.npz`` holds, for each case ``i``: ``case{i}_input`` (model space, float32 [N,C,H,W]),
``case{i}_logits`` (the reference, float32 [N,K,H,W]), optionally ``case{i}_labels`` (uint8
[N,H,W] ground truth) and ``case{i}_names`` (one display name per image: the held-out file's
relative path, ``phantom 3`` or ``synthetic: ...``). numpy only: a device without torch reads it.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attunet_deploy import limits
from attunet_deploy.bundle import GOLDEN_FILE, Bundle
from attunet_deploy.bundle.spec import GoldenInfo
from attunet_deploy.errors import BundleError, InputError

#: Images per golden case at most (cases of equal shape are batched).
CASE_BATCH = 8


@dataclass
class GoldenCase:
    inputs: np.ndarray  # model space, float32 [N, C, H, W] (3D bundles: [N, C, D, H, W])
    logits: np.ndarray  # reference logits [N, K, *spatial]
    labels: np.ndarray | None = None  # ground-truth masks [N, *spatial]
    names: list[str] = field(default_factory=list)
    #: whole volumes, run through the bundle's sliding window (``infer_volume``), not one forward pass
    volume: bool = False

    def image_names(self) -> list[str]:
        return self.names if len(self.names) == len(self.inputs) else [f"image {i}" for i in range(len(self.inputs))]


def load_golden(bundle: Bundle) -> list[GoldenCase]:
    """The bundle's golden cases, read from hash-checked bytes with bounded decompression."""
    entry = bundle.artifact(GOLDEN_FILE)
    if entry is not None and entry.bytes > limits.GOLDEN.bytes():
        raise BundleError(f"{bundle.path(GOLDEN_FILE)} is {entry.bytes / 2**20:.1f} MB, above "
                          f"{limits.GOLDEN.describe()}: set {limits.GOLDEN.env} to raise it")
    data = bundle.read_artifact(GOLDEN_FILE)
    path = bundle.path(GOLDEN_FILE)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(i.file_size for i in zf.infolist())
        if total > limits.GOLDEN.bytes():
            raise BundleError(f"{path} unpacks to {total / 2**20:.1f} MB, above {limits.GOLDEN.describe()}: set "
                              f"{limits.GOLDEN.env} to raise it")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            cases = []
            i = 0
            while f"case{i}_input" in npz:
                labels = npz.get(f"case{i}_labels", None)
                names = [str(n) for n in npz[f"case{i}_names"]] if f"case{i}_names" in npz else []
                cases.append(GoldenCase(npz[f"case{i}_input"], npz[f"case{i}_logits"], labels, names))
                i += 1
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path} is unreadable ({str(exc)[:120]}); re-export the bundle") from exc
    if not cases:
        raise BundleError(f"{path} holds no golden cases; re-export the bundle")
    for c in cases:
        rank = bundle.spatial_dims + 2
        if (c.inputs.ndim != rank or c.logits.ndim != rank or c.inputs.shape[0] != c.logits.shape[0]
                or c.inputs.shape[2:] != c.logits.shape[2:] or c.inputs.shape[1] != bundle.in_channels
                or c.logits.shape[1] != bundle.out_channels
                or (c.labels is not None and c.labels.shape != (c.inputs.shape[0], *c.inputs.shape[2:]))):
            raise BundleError(f"{path} has inconsistent shapes; re-export the bundle")
    return cases


def save_golden(fh: Any, cases: list[GoldenCase]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, c in enumerate(cases):
        arrays[f"case{i}_input"] = c.inputs
        arrays[f"case{i}_logits"] = c.logits
        if c.labels is not None:
            arrays[f"case{i}_labels"] = c.labels
        arrays[f"case{i}_names"] = np.array(c.image_names(), dtype=str)
    np.savez_compressed(fh, allow_pickle=False, **arrays)


def group_by_shape(inputs: list[np.ndarray], labels: list[np.ndarray] | None, names: list[str]
                   ) -> list[tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """Batch [C,H,W] model-space images of equal shape (at most CASE_BATCH per batch), keeping order
    within each shape."""
    order: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        order.setdefault(tuple(x.shape), []).append(i)
    out = []
    for idx in order.values():
        for s in range(0, len(idx), CASE_BATCH):
            part = idx[s:s + CASE_BATCH]
            x = np.stack([inputs[i] for i in part]).astype(np.float32)
            y = np.stack([labels[i] for i in part]).astype(np.uint8) if labels is not None else None
            out.append((x, y, [names[i] for i in part]))
    return out


def non_divisible_crop(raw: np.ndarray, label: np.ndarray | None, divisor: int
                       ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A crop of a real image whose H and W are not multiples of ``divisor`` (shape coverage)."""
    _, h, w = raw.shape
    nh = h - 1 if h % divisor == 0 and h > 1 else h
    nw = w - 3 if w % divisor == 0 and w > 3 else w
    if nh % divisor == 0 and nw % divisor == 0:
        return None
    return raw[:, :nh, :nw].copy(), (label[:nh, :nw].copy() if label is not None else None)


def describe(golden: GoldenInfo) -> str:
    """One line for `attdeploy info`: where the golden set came from."""
    if not golden.recorded:
        return "golden set: origin not recorded (bundle from an older attunet-deploy)"
    kind = golden.kind
    synth = golden.synthetic_cases
    labels = " with ground-truth labels" if golden.labels else ""
    if kind in ("user-images", "user-volumes"):
        n = sum(s.images for s in golden.sources)
        extra = f" + {synth} synthetic case(s) for shape coverage" if synth else ""
        what = "image(s)" if kind == "user-images" else "volume window(s)"
        return (f"golden set: {n} {what} from {len(golden.sources)} held-out file(s) of {golden.root or ''}"
                f"{labels}{extra}")
    if kind == "demo-phantoms":
        return f"golden set: {synth} batches of synthetic CT phantoms{labels} (demo model)"
    return (f"golden set: {synth} synthetic case(s) of smooth random fields: pass --images to export to judge "
            "backends on your own images")


def require_labels(cases: list[GoldenCase]) -> None:
    if not all(c.labels is not None for c in cases):
        raise InputError("--max-dice-drop needs ground truth: the golden set has no labels (export with "
                         "--labels, or verify --images PATH --labels PATH)")
