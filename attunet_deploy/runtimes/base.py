"""The Runner interface every backend implements (the ABC only: ``registry`` names backends,
``select`` opens them).

In Polygraphy's terms a Runner *runs* an artifact that a builder in ``attunet_deploy.build``
made. A runner only runs padded batches (``_infer_padded``); everything around that (validation,
normalisation, pad and crop, the sliding window, masks) is the bundle's
:class:`~attunet_deploy.segmenter.Segmenter`, so every backend sees byte-identical padded inputs.
"""

from __future__ import annotations

import abc
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np

from attunet_deploy.bundle import PRECISIONS, Bundle
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.segmenter import Segmenter


class Runner(abc.ABC):
    """Runs one bundle artifact. Use as a context manager, or call activate()/deactivate().

    ``infer`` takes model-space float32 [N, C, H, W] with any H and W and returns float32
    logits [N, K, H, W]; ``segment`` takes raw images and returns uint8 masks [N, H, W].
    Subclasses implement ``_activate``, ``_deactivate`` and ``_infer_padded``.
    """

    backend: ClassVar[str] = ""
    #: precisions this backend can run; a subclass narrows it.
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS

    def __init__(self, bundle: Bundle, precision: str = "fp32", **options: Any) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            raise BackendUnavailable(f"backend {self.backend} does not run {precision} "
                                     f"(it runs {', '.join(self.precisions)})")
        self.bundle = bundle
        self.precision = precision
        self.options = options
        self.segmenter = Segmenter(bundle.spec, bad_output=BackendUnavailable)
        self.channels = bundle.in_channels
        self.out_channels = bundle.out_channels
        self.divisor = bundle.divisor
        self.spatial_dims = bundle.spatial_dims
        self.divisors = bundle.divisors
        self.is_active = False
        self._activate_lock = threading.Lock()
        self._local = threading.local()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        """None if this backend can plausibly run here, else the reason it cannot.

        Cheap checks only; some failures (an ONNX Runtime provider falling back to CPU) are
        found only by ``activate`` and raised there as BackendUnavailable.
        """
        return None

    def activate(self) -> Runner:
        """Open the backend, then check it on the bundle's self-check input (runtimes/selfcheck.py)
        before any answer: a runner whose output is not the verified one refuses to run."""
        with self._activate_lock:
            if not self.is_active:
                self._activate()
                self.is_active = True
                try:
                    self._self_check()
                except BaseException:
                    self.is_active = False
                    self._deactivate()
                    raise
        return self

    #: seconds the self-check took on activation (None: not run)
    self_check_seconds: float | None = None

    def _self_check(self) -> None:
        from attunet_deploy.runtimes import selfcheck

        if not selfcheck.enabled(self.options):
            return
        ref = selfcheck.load_selfcheck(self.bundle)
        if ref is None:
            return
        t0 = time.perf_counter()
        try:
            y = self.infer(ref.inputs)
        except InputError:
            raise
        except Exception as exc:  # a graph that cannot run the stored input, or answers in another shape, is not
            # the verified model (the Segmenter's shape check raises BackendUnavailable for the latter)
            raise selfcheck.SelfCheckFailed(f"{self.name} refuses to run: it cannot run {ref.source}'s "
                                            f"{list(ref.inputs.shape)} input ({type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                                            f"{self.suspects()}") from None
        why = selfcheck.compare(self.precision, y, ref.logits,
                                (self.segmenter.masks(y), self.segmenter.masks(ref.logits)))
        self.self_check_seconds = time.perf_counter() - t0
        if why is not None:
            raise selfcheck.SelfCheckFailed(f"{self.name} refuses to run: its output on {ref.source} is not the "
                                            f"verified one ({why}); {self.suspects()}")
        self._seal_caches()

    def suspects(self) -> str:
        """What to delete or re-make when the self-check misses (a backend with caches says which)."""
        return ("its graph or this machine's libraries changed since verification: run 'attdeploy verify' and, if it "
                "fails, re-export or re-quantize the bundle")

    def _seal_caches(self) -> None:  # noqa: B027  # a hook: most backends keep no run-time cache
        """Record digests of run-time caches the backend wrote (runtimes/cachedigest.py); none by default."""

    def deactivate(self) -> None:
        with self._activate_lock:
            if self.is_active:
                self._deactivate()
                self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def device(self) -> str:
        """Where the model runs, e.g. 'cpu', 'cuda:0 (NVIDIA H100)'."""
        return "cpu"

    def get_input_metadata(self) -> dict[str, dict[str, object]]:
        return {"image": {"dtype": "float32", "shape": ("N", self.channels, *"DHW"[-self.spatial_dims:])}}

    def last_inference_time(self) -> float | None:
        """Seconds the calling thread's last ``infer`` spent in the backend (after padding)."""
        return getattr(self._local, "last_time", None)

    # ------------------------------------------------------------------ inference
    def _run_padded(self, xp: np.ndarray) -> np.ndarray:
        """The backend on one padded batch: memory check, lazy activation, timing."""
        self.check_memory(xp.shape)
        if not self.is_active:
            self.activate()
        t0 = time.perf_counter()
        y = self._infer_padded(xp)
        self._local.last_time = time.perf_counter() - t0
        return y

    def infer(self, images: Any) -> np.ndarray:
        """Logits for a model-space batch [N, C, H, W] (3D bundles: [N, C, D, H, W]) of any spatial size
        (padded up to the divisors and cropped back by the Segmenter)."""
        return self.segmenter.infer(self._run_padded, images, who=self.name)

    def infer_many(self, batches: Iterable[Any]) -> Iterator[np.ndarray]:
        """Logits of each batch, in order: ``infer`` over a stream. Backends that keep several
        requests in flight (OpenVINO's throughput streams) overlap them; the results and their
        order are those of ``infer`` one by one."""
        if not self.is_active:
            self.activate()
        return self.segmenter.infer_stream(self._infer_stream, batches, check=lambda xp: self.check_memory(xp.shape))

    def segment_many(self, raw_batches: Iterable[Any], observe: Callable[[np.ndarray], Any] | None = None
                     ) -> Iterator[np.ndarray]:
        """uint8 masks of each raw batch, in order, through one request stream (``infer_many``);
        ``observe`` sees each batch's logits."""
        if not self.is_active:
            self.activate()
        return self.segmenter.segment_stream(self._infer_stream, raw_batches,
                                             check=lambda xp: self.check_memory(xp.shape), observe=observe)

    def _infer_stream(self, items: Iterator[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """(padded logits, tag) for each (padded batch, tag), in order; one at a time by default."""
        for xp, tag in items:
            yield self._infer_padded(xp), tag

    def check_memory(self, shape: tuple[int, ...]) -> None:
        """Refuse a batch whose activations would not fit in this machine's free memory (CPU
        backends), instead of swapping or dying in the backend's allocator."""
        if not self.device.startswith("cpu") or os.environ.get("ATTDEPLOY_MEMORY_CHECK", "1") == "0":
            return
        need = activation_bytes(shape, first_width(self.bundle.config))
        try:
            import psutil

            free = psutil.virtual_memory().available
        except Exception:
            return
        if need > free:
            raise InputError(f"input {'x'.join(map(str, shape))} needs about {need / 2**30:.1f} GB for activations, "
                             f"this machine has {free / 2**30:.1f} GB available: split the batch or tile the image "
                             "(ATTDEPLOY_MEMORY_CHECK=0 skips this check)")

    def timed_infer(self, padded: np.ndarray) -> float | None:
        """Run on an already padded, validated batch (benchmark path, no checks or copies).

        Returns device-side seconds when the backend measures them (CUDA events), else None.
        """
        if not self.is_active:
            self.activate()
        self._infer_padded(padded)
        return None

    def device_compute_times(self, padded: np.ndarray, iterations: int) -> list[float] | None:
        """Optional hook: seconds of device compute alone for ``iterations`` runs of an already padded
        batch (CUDA events around the enqueue, what trtexec calls GPU Compute Time); None where the
        backend has no device timer."""
        return None

    def bench_extras(self) -> dict[str, object]:
        """Backend facts worth recording with a benchmark (device memory, CUDA graphs, ...)."""
        return {}

    def preprocess(self, raw: Any) -> np.ndarray:
        """Raw images ([N,C,H,W], [C,H,W] or [H,W] for one channel) -> model space [N,C,H,W];
        3D bundles: raw volumes ([N,C,D,H,W], [C,D,H,W] or [D,H,W]) -> [N,C,D,H,W]."""
        return self.segmenter.prepare(raw)

    def segment(self, raw: Any) -> np.ndarray:
        """Normalise raw images, infer, post-process: uint8 masks [N, H, W]."""
        return self.segmenter.segment(self._run_padded, raw, who=self.name)

    def infer_volume(self, volume: Any) -> np.ndarray:
        """Logits of model-space volumes [N, C, D, H, W] of any size, by the bundle's sliding window
        (roi, overlap, mode, sigma_scale, windows per call): [N, K, D, H, W]."""
        return self.segmenter.infer_volume(self._run_padded, volume, who=self.name)

    def segment_volume(self, raw: Any, spacing: tuple[float, float, float] | None = None,
                       observe: Callable[[np.ndarray], Any] | None = None) -> np.ndarray:
        """Raw volume [D, H, W] (or [C, D, H, W]) -> uint8 labels [D, H, W] (class index, or 0/1 for one
        output channel). With ``spacing`` (z, y, x in mm) and a bundle spacing, the volume is resampled
        to the model's spacing (linear) and the labels back to the volume's grid (nearest). ``observe``
        sees the volume's logits."""
        return self.segmenter.segment_volume(self._run_padded, raw, spacing, who=self.name, observe=observe)

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        """Run the backend on float32 [N, C, H, W] with H, W multiples of ``divisor``."""


def first_width(config: Mapping[str, Any]) -> int:
    """Channels of a model's full-resolution level, whatever its family's config calls it."""
    if "base_channels" in config:
        return int(config["base_channels"])
    if "channels" in config:  # MONAI
        return int(config["channels"][0])
    return max(1, int(64 / float(config.get("feature_scale", 1))))  # the paper's 3D networks


def activation_bytes(shape: tuple[int, ...], base_channels: int) -> int:
    """Rough peak activation memory of an Attention U-Net forward pass on CPU backends.

    The full-resolution level holds about 8 tensors of ``base_channels`` x H x W float32 at the
    peak (skip, decoder concat, convolution workspace); deeper levels add about a third more.
    """
    voxels = int(np.prod(shape[2:], dtype=np.float64))
    return int(shape[0] * voxels * base_channels * 4 * 8 * 4 / 3)
