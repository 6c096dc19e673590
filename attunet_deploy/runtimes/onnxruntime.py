"""ONNX Runtime runners: CPU (``ort``), CUDA (``ort-cuda``) and TensorRT EP (``ort-trt``).

ONNX Runtime lists CUDA/TensorRT providers even where their libraries are missing and then
silently falls back to CPU; the runner checks ``session.get_providers()`` after creating
the session and raises BackendUnavailable instead of passing a CPU run off as a GPU one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import ENGINE_DIR, ONNX_FILES, Bundle
from attunet_deploy.environment import cuda_devices, has_module, module_version, tensorrt_major
from attunet_deploy.errors import BackendUnavailable
from attunet_deploy.runtimes import cachedigest
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import register


class _OrtRunner(Runner):
    """Options: ``threads`` (intra-op threads; 0 = ONNX Runtime's default, all cores)."""

    provider = "CPUExecutionProvider"

    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        if not has_module("onnxruntime"):
            return "onnxruntime is not installed (pip install onnxruntime)"
        name = ONNX_FILES[precision]
        if not bundle.has(name):
            return f"bundle has no {name} (run 'attdeploy quantize')" if precision != "fp32" else \
                f"bundle has no {name}"
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            return f"this onnxruntime build has no {cls.provider} (install onnxruntime-gpu)"
        return cls._gpu_reason()

    @classmethod
    def _gpu_reason(cls) -> str | None:
        return None

    def _providers(self) -> list[Any]:
        return [self.provider]

    def _needs_exact_int8(self) -> bool:
        from attunet_deploy.environment import cpu_has_int8_dot

        if self.precision != "int8" or self.provider != "CPUExecutionProvider":
            return False
        entry = self.bundle.artifact(ONNX_FILES["int8"])
        return (entry is None or entry.producer.weight_bits == 8) and not cpu_has_int8_dot()

    def _activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(self.options.get("threads") or 0)
        if not self.options.get("spinning", True):
            # Idle sessions' spinning threads steal the CPU from whatever runs next: off when several
            # backends are timed side by side (bench), so each ratio measures the backend alone.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # provider fallbacks are reported by us, not as red log lines
        if self._needs_exact_int8():
            # Full-range int8 weights on an x86 CPU without VNNI: ORT's default u8s8 path
            # saturates (see export.quantize.quantize_int8); its s8s8 path is exact, only slower.
            opts.add_session_config_entry("session.qdqisint8allowed", "1")
        path = self.bundle.onnx_path(self.precision)
        model = self.bundle.read_artifact(ONNX_FILES[self.precision])  # exactly the bytes whose sha256 we checked
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=self._providers())
        except Exception as exc:
            raise BackendUnavailable(f"{self.backend}: cannot create a session for {path.name}: "
                                     f"{str(exc).splitlines()[0][:200]}") from exc
        used = self._session.get_providers()
        if not used or used[0] != self.provider:
            self._session = None
            raise BackendUnavailable(f"{self.backend}: ONNX Runtime fell back to {used[0] if used else 'nothing'} "
                                     f"instead of {self.provider} (CUDA/cuDNN/TensorRT libraries missing?)")
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name

    def _deactivate(self) -> None:
        self._session = None

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        # InferenceSession.run is thread-safe: one session serves every thread.
        return self._session.run([self._output], {self._input: x})[0]


@register
class OrtCpuRunner(_OrtRunner):
    backend = "ort"
    provider = "CPUExecutionProvider"


@register
class OrtCudaRunner(_OrtRunner):
    backend = "ort-cuda"
    provider = "CUDAExecutionProvider"

    @classmethod
    def _gpu_reason(cls) -> str | None:
        cuda = cuda_devices()
        if not cuda.available and not has_module("cuda"):
            # Without cuda-python we cannot count devices cheaply; activate() decides.
            return None
        return None if cuda.available else cuda.detail

    def _providers(self) -> list[Any]:
        return [(self.provider, {"device_id": int(self.options.get("device_id", 0))}), "CPUExecutionProvider"]

    @property
    def device(self) -> str:
        return f"cuda:{int(self.options.get('device_id', 0))}"


@register
class OrtTensorrtRunner(OrtCudaRunner):
    """TensorRT execution provider; its engine cache lives in the bundle's engines/ort-trt/."""

    backend = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def _providers(self) -> list[Any]:
        graph_sha = self.bundle.sha256(ONNX_FILES[self.precision]) or "unlisted"
        # ONNX Runtime keys its engine cache on the model's file name and node names, not its
        # weights or scales: a folder per graph sha256 keeps a re-calibrated graph from running
        # an old engine (quantize also deletes the old folders).
        cache = Path(self.bundle.root) / ENGINE_DIR / "ort-trt" / f"{self.precision}-{graph_sha[:12]}"
        cache.mkdir(parents=True, exist_ok=True)
        # the EP loads a cached engine without checking it: each file carries a digest sidecar
        cachedigest.check(cache, TRT_EP_PATTERNS, say=lambda text: print(f"note: {text}", file=sys.stderr))
        self._cache = cache
        flags = ort_trt_needs_flags(_ort_version(), module_version("tensorrt"))
        trt_opts: dict[str, str | int | bool] = {
            "device_id": int(self.options.get("device_id", 0)),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }
        if flags:
            # TensorRT < 10 behind the EP: weakly typed builds need the flags to accept the FP16
            # graph / Q/DQ graph. On TensorRT >= 10 both must stay off: the EP then builds
            # strongly typed, so the graph's float32 layers (--fp16-keep-fp32) stay float32.
            trt_opts["trt_fp16_enable"] = self.precision == "fp16"
            trt_opts["trt_int8_enable"] = self.precision == "int8"
        return [(self.provider, trt_opts),
                ("CUDAExecutionProvider", {"device_id": trt_opts["device_id"]}), "CPUExecutionProvider"]

    def _seal_caches(self) -> None:
        # after the self-check's inference, which is when the EP builds (and caches) its engine
        if getattr(self, "_cache", None) is not None:
            cachedigest.seal(self._cache, TRT_EP_PATTERNS)

    def suspects(self) -> str:
        cache = getattr(self, "_cache", None)
        return (f"delete {cache} (the TensorRT EP rebuilds its engines); " if cache is not None else "") + \
            "if it still fails, run 'attdeploy verify --backend ort-trt'"


#: What ONNX Runtime's TensorRT EP writes into its cache folder: engines, their optimisation profiles,
#: and the timing cache.
TRT_EP_PATTERNS = ("*.engine", "*.profile", "*.timing")


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def ort_trt_needs_flags(ort_version: str, trt_version: str | None) -> bool:
    """True when ONNX Runtime's TensorRT EP needs trt_fp16_enable/trt_int8_enable for our graphs.

    The EP builds strongly typed (precision from the graph) only when both flags are false,
    which TensorRT >= 10 supports. The TensorRT behind the EP is the installed ``tensorrt``
    module's when there is one, else the one ONNX Runtime's GPU wheels link: 10.x from 1.18 on.
    """
    if trt_version:
        return tensorrt_major(trt_version) < 10
    try:
        major, minor = (int(p) for p in ort_version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (1, 18)
