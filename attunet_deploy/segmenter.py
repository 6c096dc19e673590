"""How a mask is made, in one place: normalise -> pad -> infer -> crop -> mask (and for volumes the
spacing resample and the sliding window), over any ``infer_fn(x) -> logits``.

As MONAI's ``Inferer`` takes any callable network, the :class:`Segmenter` takes any function that
maps a padded model-space batch to logits of the same spatial size: a runner's backend, a raw ONNX
Runtime session (quantize's Dice gate), an OpenVINO compiled model (NNCF's validation function), a
torch module (export's golden outputs), or a Triton request (the served volume model). Every path
that turns images into masks goes through it, so they cannot drift apart; ``normalize``,
``pad_to_divisor``, ``crop``, ``logits_to_masks`` and the resamplers are called from here only
(``tests/unit/test_architecture.py`` holds that).

numpy only: the Triton python models ship this module beside their model.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from attunet_deploy.bundle.spec import ModelSpec, Normalization, Postprocessing
from attunet_deploy.errors import AttDeployError, InputError
from attunet_deploy.preprocess import (
    check_batch,
    crop,
    logits_to_masks,
    normalize,
    pad_to_divisor,
    resample_linear,
    resample_nearest,
    resampled_shape,
)
from attunet_deploy.window import sliding_window

#: A padded model-space batch [N, C, *spatial] (multiples of the divisors) -> logits [N, K, *spatial].
InferFn = Callable[[np.ndarray], np.ndarray]
Tag = TypeVar("Tag")
#: (padded batch, tag) pairs in, (padded logits, tag) out, in order (a backend's request stream).
StreamFn = Callable[[Iterator[tuple[np.ndarray, Any]]], Iterator[tuple[np.ndarray, Any]]]
Spacing = tuple[float, float, float]


class Segmenter:
    """The mask chain of one model (its :class:`~attunet_deploy.bundle.spec.ModelSpec`).

    A function whose logits do not match its input's shape raises ``bad_output`` naming ``who``.
    """

    def __init__(self, spec: ModelSpec, bad_output: type[AttDeployError] = InputError) -> None:
        self.spec = spec
        #: what a wrong-shaped output raises (a runner's backend: BackendUnavailable)
        self.bad_output = bad_output
        self.channels = spec.input.channels
        self.out_channels = spec.input.out_channels
        self.spatial_dims = spec.input.spatial_dims
        self.divisors = spec.input.divisors

    # ------------------------------------------------------------------ model space
    def batch(self, images: Any, name: str = "images") -> np.ndarray:
        """A validated model-space batch, float32 [N, C, *spatial]."""
        return check_batch(images, self.channels, name=name, spatial_dims=self.spatial_dims)

    def as_batch(self, raw: Any, name: str = "images") -> np.ndarray:
        """Raw images as a validated batch: [N,C,*s], [C,*s], or for a one-channel model [*s] and a stack
        [N,*s] (which can only mean N images)."""
        arr = np.asarray(raw)
        dims = self.spatial_dims
        if arr.ndim == dims and self.channels == 1:
            arr = arr[None, None]
        elif arr.ndim == dims + 1 and arr.shape[0] == self.channels:
            arr = arr[None]
        elif arr.ndim == dims + 1 and self.channels == 1 and dims == 2:
            arr = arr[:, None]  # [N, H, W] slices of a one-channel 2D model
        return check_batch(arr, self.channels, name=name, spatial_dims=dims)

    def prepare(self, raw: Any, name: str = "images") -> np.ndarray:
        """Raw images -> normalised model space [N, C, *spatial] (float32)."""
        return self.normalize(self.as_batch(raw, name))

    def normalize(self, batch: np.ndarray, normalization: Normalization | None = None) -> np.ndarray:
        """The bundle's intensity normalisation of a raw batch [N, C, *spatial] (no other checks)."""
        return normalize(batch, normalization or self.spec.normalization)

    def pad(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """(x padded up to the divisors, the spatial size to crop back to)."""
        return pad_to_divisor(x, self.divisors)

    def crop(self, y: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
        return crop(y, size)

    def check_logits(self, y: np.ndarray, xp: np.ndarray, who: str) -> np.ndarray:
        """``y`` as float32, or InputError when it is not [N, K, *spatial] of the padded input ``xp``."""
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != xp.ndim or y.shape[0] != xp.shape[0] or y.shape[1] != self.out_channels \
                or y.shape[2:] != xp.shape[2:]:
            raise self.bad_output(f"{who} returned logits of shape {tuple(y.shape)} for input {tuple(xp.shape)}: "
                             f"expected [N, {self.out_channels}, {', '.join('DHW'[-self.spatial_dims:])}]")
        return y

    # ------------------------------------------------------------------ inference
    def infer(self, infer_fn: InferFn, images: Any, who: str = "the model") -> np.ndarray:
        """Logits of a model-space batch of any spatial size: padded, ``infer_fn``, cropped back."""
        x = self.batch(images)
        xp, size = self.pad(x)
        return self.crop(self.check_logits(infer_fn(xp), xp, who), size)

    def infer_stream(self, stream_fn: StreamFn, batches: Iterable[Any], check: Callable[[np.ndarray], None]
                     | None = None) -> Iterator[np.ndarray]:
        """Logits of each model-space batch, in order, through a backend's request stream."""
        def padded() -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
            for images in batches:
                xp, size = self.pad(self.batch(images))
                if check is not None:
                    check(xp)
                yield xp, size

        for y, size in stream_fn(padded()):
            yield self.crop(np.asarray(y, dtype=np.float32), size)

    def infer_volume(self, infer_fn: InferFn, volume: Any, who: str = "the model",
                     progress: Callable[[int], Any] | None = None) -> np.ndarray:
        """Logits of model-space volumes [N, C, D, H, W] of any size by the spec's sliding window."""
        window = self.spec.sliding_window
        if window is None or self.spatial_dims != 3:
            raise InputError(f"infer_volume needs a 3D bundle (layout NCDHW); this one is {self.spec.input.layout}: "
                             "use infer() or segment()")
        x = check_batch(volume, self.channels, spatial_dims=3, name="volume")
        return sliding_window(lambda w: self.infer(infer_fn, w, who), x, window, progress=progress)

    # ------------------------------------------------------------------ masks
    def masks(self, logits: np.ndarray, postprocessing: Postprocessing | None = None) -> np.ndarray:
        """[N, K, *spatial] logits -> uint8 masks [N, *spatial]: threshold or argmax, then the spec's
        component clean-up (largest component per class, smallest component), per image or volume."""
        post = postprocessing or self.spec.postprocessing
        masks = logits_to_masks(logits, post)
        if not post.cleans_components:
            return masks
        from attunet_deploy.components import clean

        classes = self.spec.input.classes
        return np.stack([clean(m, classes, post.keep_largest, self.min_voxels(post)) for m in masks])

    def min_voxels(self, post: Postprocessing) -> int | None:
        """``min_component_ml`` as voxels of the model's grid (None when it is not set)."""
        if post.min_component_ml is None or self.spec.spacing is None:
            return None
        voxel_ml = float(np.prod(self.spec.spacing)) / 1000.0
        return max(1, int(np.ceil(post.min_component_ml / voxel_ml)))

    def segment(self, infer_fn: InferFn, raw: Any, who: str = "the model") -> np.ndarray:
        """Raw images -> uint8 masks [N, *spatial]: normalise, pad, infer, crop, mask."""
        return self.masks(self.infer(infer_fn, self.prepare(raw), who))

    def segment_stream(self, stream_fn: StreamFn, raw_batches: Iterable[Any],
                       check: Callable[[np.ndarray], None] | None = None,
                       observe: Callable[[np.ndarray], Any] | None = None) -> Iterator[np.ndarray]:
        """uint8 masks of each raw batch, in order, through one request stream: a batch is taken (read,
        decoded) only when the stream has room for it. ``observe`` sees each batch's logits (QA)."""
        model_space = (self.prepare(raw) for raw in raw_batches)
        for logits in self.infer_stream(stream_fn, model_space, check):
            if observe is not None:
                observe(logits)
            yield self.masks(logits)

    def segment_volume(self, infer_fn: InferFn, raw: Any, spacing: Spacing | None = None,
                       who: str = "the model", observe: Callable[[np.ndarray], Any] | None = None) -> np.ndarray:
        """Raw volume [D, H, W] (or [C, D, H, W]) -> uint8 labels [D, H, W]. With ``spacing`` (z, y, x
        mm) and a spec spacing, the volume is resampled to the model's spacing (linear) and the
        labels back to the volume's grid (nearest)."""
        arr = np.asarray(raw)
        if arr.ndim not in (3, 4):
            raise InputError(f"segment_volume takes one volume [D, H, W] or [C, D, H, W], got shape {arr.shape}")
        x = self.to_model_grid(self.prepare(arr, "volume"), spacing)
        size = arr.shape[-3:]
        logits = self.infer_volume(infer_fn, x, who)
        if observe is not None:
            observe(logits)
        masks = self.masks(logits)[0]
        if masks.shape != size:
            masks = resample_nearest(masks, size)
        return masks.astype(np.uint8)

    # ------------------------------------------------------------------ grids
    def to_model_grid(self, x: np.ndarray, spacing: Spacing | None) -> np.ndarray:
        """Normalised volumes [..., D, H, W] at ``spacing`` resampled (linear) to the spec's spacing;
        unchanged when either spacing is unknown."""
        if spacing is not None:
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise InputError(f"spacing {spacing!r}: three positive numbers (z, y, x) in mm")
            if self.spec.spacing is not None:
                return resample_linear(x, resampled_shape(x.shape[-3:], spacing, self.spec.spacing))
        return x

    @staticmethod
    def labels_to(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Label volumes [..., D, H, W] resampled to ``shape`` by nearest neighbour (values kept)."""
        return resample_nearest(labels, shape)
