"""OpenVINO runner (``ov``): the bundle's ONNX graphs on Intel/AMD CPUs, same Runner interface.

Precision is pinned, never left to the plugin: OpenVINO's CPU plugin runs "FP32" in bf16 on
CPUs with AVX-512 BF16 or AMX unless told otherwise (measured rel L2 2e-3 against FP32).

- fp32: ``model.onnx`` with ``INFERENCE_PRECISION_HINT=f32``
- fp16: the fastest exact-enough of f16 (``model.fp16.onnx``, AVX-512/AMX FP16), bf16 (``model.onnx``,
  AVX-512/AMX BF16) and ``model.fp16.onnx`` computed in f32, measured once per machine and graphs
  (``runtimes/ov_precision.py``); the device string says which (``cpu (bf16)``)
- int8: ``model.int8.ov.xml`` (NNCF's OpenVINO-native INT8 graph, build/ov_int8.py) when the bundle
  has it, else ``model.int8.onnx`` (its Q/DQ pairs become OpenVINO's int8 kernels); an f32 hint for
  the float parts; ``bench_extras`` says which graph ran (option ``qdq_graph=True`` forces the Q/DQ one)

Each input shape the runner meets again (the first :data:`STATIC_SHAPES` of them) gets its own
model compiled with that shape fixed: OpenVINO's CPU plugin plans memory and picks kernels once for a
static shape, and that measured 4-8 % faster than the dynamic-shape model per call (INT8 and FP32,
demo model at 256x256, 512x512 and batch 4; compiling one takes about 0.2 s). Further shapes run
on the one dynamic-shape model. Compiled models are cached in the bundle's ``engines/openvino/``
(when the bundle is writable).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import ENGINE_DIR, ONNX_FILES, OV_INT8_BIN, OV_INT8_XML, Bundle
from attunet_deploy.environment import has_module, machine_info
from attunet_deploy.errors import BackendUnavailable
from attunet_deploy.runtimes import cachedigest
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import register

#: Input shapes that get a model compiled for them alone (then the dynamic-shape model serves).
STATIC_SHAPES = 8
#: Infer requests per stream in ``infer_many``: with one request per stream (OpenVINO's optimal
#: number) a stream idles while Python collects its result and feeds it the next image; a second
#: request waiting keeps it busy. Demo model at 1x1x512x512 on 2 cores (2 streams): benchmark_app
#: with 4 requests against its default 2, three interleaved pairs: 25.9/21.2, 25.8/24.3, 21.8/20.6 FPS.
QUEUE_DEPTH = 2


def precision_plan(precision: str, isa: list[str]) -> tuple[str, str]:
    """(graph file, OpenVINO inference precision hint) for a bundle precision on a CPU with ``isa``."""
    if precision == "fp32":
        return ONNX_FILES["fp32"], "f32"
    if precision == "int8":
        return ONNX_FILES["int8"], "f32"
    from attunet_deploy.runtimes.ov_precision import fixed_rule

    hint, graph = fixed_rule(isa)  # the fp16 row's mode when nothing was measured (ov_precision.choose)
    return graph, hint


#: OpenVINO's compiled-model cache files (CACHE_DIR): one blob per compiled network and device.
BLOB_PATTERNS = ("*.blob",)


def _say(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


@register
class OpenVinoRunner(Runner):
    """Options: ``threads`` (INFERENCE_NUM_THREADS, default all cores, like the other CPU backends);
    ``hint`` (``bf16`` or ``f16``) pins the 16-bit row's OpenVINO precision instead of the CPU's default
    (``bf16`` runs ``model.onnx`` in bf16, ``f16`` runs ``model.fp16.onnx`` in f16)."""

    backend = "ov"

    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        if not has_module("openvino"):
            return "openvino is not installed (pip install 'attunet-deploy[openvino]')"
        graph, _ = precision_plan(precision, machine_info()["isa"])
        if not bundle.has(graph) or not bundle.has(ONNX_FILES[precision]):
            return f"bundle has no {ONNX_FILES[precision]} (run 'attdeploy quantize')"
        return None

    def _activate(self) -> None:
        import openvino as ov

        graph, hint = precision_plan(self.precision, machine_info()["isa"])
        self._choice: dict[str, object] = {}
        pinned = self.options.get("hint")
        if pinned is not None:
            if self.precision != "fp16" or pinned not in ("bf16", "f16"):
                raise BackendUnavailable(f"OpenVINO hint {pinned!r}: only the fp16 row takes one, bf16 or f16")
            graph, hint = (ONNX_FILES["fp32"] if pinned == "bf16" else ONNX_FILES["fp16"]), pinned
        core = ov.Core()
        if "CPU" not in core.available_devices:
            raise BackendUnavailable("OpenVINO sees no CPU device")
        if self.precision == "fp16" and pinned is None:
            from attunet_deploy.runtimes import ov_precision

            def compile_for(g: str, h: str) -> Any:
                return core.compile_model(core.read_model(self.bundle.read_artifact(g)), "CPU",
                                          {"INFERENCE_PRECISION_HINT": h, "PERFORMANCE_HINT": "LATENCY",
                                           "INFERENCE_NUM_THREADS": int(self.options.get("threads") or
                                                                        os.cpu_count() or 1)})

            try:
                hint, graph, self._choice = ov_precision.choose(self.bundle, compile_for)
            except RuntimeError as exc:
                raise BackendUnavailable(f"OpenVINO cannot compile the 16-bit candidates: "
                                         f"{str(exc).splitlines()[0][:200]}") from exc
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": int(self.options.get("threads") or os.cpu_count() or 1),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        cache = self.bundle.root / ENGINE_DIR / "openvino"
        self._cache: Path | None = None
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if os.access(cache, os.W_OK):
                # OpenVINO loads a cached blob without checking it: each one carries a digest sidecar
                cachedigest.check(cache, BLOB_PATTERNS, say=_say)
                config["CACHE_DIR"] = str(cache)
                self._cache = cache
        except OSError:
            pass  # a read-only bundle: compile every time
        # NNCF's graph when the manifest lists it: a listed file that is missing is an error, never a
        # silent run of the Q/DQ graph instead
        native = self.precision == "int8" and (self.bundle.lists(OV_INT8_XML) or self.bundle.lists(OV_INT8_BIN)) \
            and not self.options.get("qdq_graph")
        if native:
            self.bundle.require(OV_INT8_XML)
            self.bundle.require(OV_INT8_BIN)
        try:
            if native:  # NNCF's OpenVINO-native INT8 graph, from the bytes whose sha256 was checked
                graph = OV_INT8_XML
                model = core.read_model(model=self.bundle.read_artifact(OV_INT8_XML).decode("utf-8"),
                                        weights=ov.Tensor(np.frombuffer(self.bundle.read_artifact(OV_INT8_BIN),
                                                                        np.uint8)))
            else:
                model = core.read_model(self.bundle.read_artifact(graph))  # the bytes whose sha256 was checked
        except RuntimeError as exc:
            raise BackendUnavailable(f"OpenVINO cannot read {graph}: {str(exc).splitlines()[0][:200]}") from exc
        self._core, self._model, self._config = core, model, config
        # The dynamic-shape latency model is compiled on first use: a stream (predict, the DICOM node)
        # runs on throughput models only, and compiling one it never uses cost 65-200 ms per run.
        self._compiled: Any = None
        self._static: dict[tuple[int, ...], Any] = {}
        self._seen: set[tuple[int, ...]] = set()
        self._throughput: dict[tuple[int, ...] | None, Any] = {}  # None: the dynamic-shape one
        self._lock = threading.Lock()
        self._hint = hint
        self._graph = graph
        self._requests = threading.local()

    def _deactivate(self) -> None:
        self._compiled = None
        self._static = {}
        self._throughput = {}
        self._model = None
        self._requests = threading.local()

    def _compile(self, model: Any, config: dict[str, str | int]) -> Any:
        try:
            compiled = self._core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BackendUnavailable(f"OpenVINO cannot compile {self._graph}: "
                                     f"{str(exc).splitlines()[0][:200]}") from exc
        if self.is_active and getattr(self, "_cache", None) is not None:
            self._seal_caches()  # a blob compiled after the self-check (another shape) is sealed as it appears
        return compiled

    def _seal_caches(self) -> None:
        if self._cache is not None:
            cachedigest.seal(self._cache, BLOB_PATTERNS)

    def suspects(self) -> str:
        cache = getattr(self, "_cache", None)
        where = f"delete {cache} (OpenVINO rebuilds it); if it still fails, " if cache is not None else ""
        return where + f"run 'attdeploy verify -b {self.bundle.root} --backend ov' and re-quantize if it fails"

    def _dynamic(self) -> Any:
        """The dynamic-shape latency model (caller holds ``_lock``)."""
        if self._compiled is None:
            self._compiled = self._compile(self._model, self._config)
        return self._compiled

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:
        """The model compiled for this input shape alone (from the second call with it, for the first
        STATIC_SHAPES shapes), else the dynamic-shape one; a shape the static compile refuses falls
        back to the dynamic one."""
        with self._lock:
            if shape in self._static:
                return self._static[shape]
            if len(self._static) >= STATIC_SHAPES:
                return self._dynamic()
            if shape not in self._seen:  # a shape met once (a verification batch) is not worth a compile
                if len(self._seen) < 64:
                    self._seen.add(shape)
                return self._dynamic()
            fixed = self._model.clone()
            try:
                fixed.reshape(list(shape))
                self._static[shape] = self._core.compile_model(fixed, "CPU", self._config)
            except RuntimeError:
                self._static[shape] = self._dynamic()
            return self._static[shape]

    @property
    def device(self) -> str:
        hint = getattr(self, "_hint", "f32")
        if str(getattr(self, "_graph", "")).endswith(".ov.xml"):
            return "cpu (NNCF IR)"  # NNCF's OpenVINO-native INT8 graph, not the Q/DQ ONNX one
        return "cpu" if hint == "f32" else f"cpu ({hint})"

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        # An infer request is not thread-safe: one per thread and compiled model.
        requests = getattr(self._requests, "by_shape", None)
        if requests is None:
            requests = self._requests.by_shape = {}
        compiled = self._compiled_for(tuple(x.shape))
        req = requests.get(id(compiled))
        if req is None:
            req = requests[id(compiled)] = compiled.create_infer_request()
        out = req.infer({0: x})
        # The request reuses its output tensor on the next call: copy.
        return np.array(next(iter(out.values())), dtype=np.float32, copy=True)

    def _infer_stream(self, items: Iterator[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """Several requests in flight on a model compiled with the THROUGHPUT hint (OpenVINO splits
        the cores into streams), one model per run of same-shape inputs; results in input order.

        A batch of N goes in as N one-image requests (reassembled on the way out): a batch of 8 as one
        request kept one stream busy while the other idled (the DICOM node's 8-slice batches: 12
        slices/s where one-image requests on both streams give about 24, demo model at 512x512 on 2
        cores), and one model per image shape serves every batch size.

        The requests are a ring used oldest first, waited for and read on this thread. No Python
        callback is handed to OpenVINO (``AsyncInferQueue.set_callback``): a stream thread that still
        holds one when its compiled model is released needs the GIL that the releasing thread holds,
        and ``deactivate`` hung in ``~CPUStreamsExecutor`` (3 of 6 runs of a script of in-process predicts).
        """
        in_flight: collections.deque[tuple[Any, tuple[int, int]]] = collections.deque()  # oldest first
        free: list[Any] = []
        pending: collections.deque[tuple[int, int, Any]] = collections.deque()  # (index, parts, tag)
        done: dict[tuple[int, int], np.ndarray] = {}

        def collect_oldest() -> None:
            request, key = in_flight.popleft()
            request.wait()  # releases the GIL
            done[key] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
            free.append(request)

        def ready() -> Iterator[tuple[np.ndarray, Any]]:
            while pending and all((pending[0][0], j) in done for j in range(pending[0][1])):
                i, n, t = pending.popleft()
                parts = [done.pop((i, j)) for j in range(n)]
                yield (parts[0] if n == 1 else np.concatenate(parts)), t

        shape = None
        try:
            for index, (xp, tag) in enumerate(items):
                one = (1, *xp.shape[1:])
                if one != shape:
                    while in_flight:
                        collect_oldest()
                    compiled = self._throughput_for(one)
                    depth = QUEUE_DEPTH * int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                    free = [compiled.create_infer_request() for _ in range(depth)]
                    shape = one
                for j in range(len(xp)):
                    if not free:
                        collect_oldest()
                    request = free.pop()
                    request.start_async({0: xp[j:j + 1]})
                    in_flight.append((request, (index, j)))
                pending.append((index, len(xp), tag))
                yield from ready()
            while in_flight:
                collect_oldest()
        finally:
            # Also when the caller stops early or the input stream raises: no request may outlive this.
            for request, _ in in_flight:
                with contextlib.suppress(Exception):  # the error that stopped the stream is the one to see
                    request.wait()
        yield from ready()

    def _throughput_for(self, shape: tuple[int, ...]) -> Any:
        """The model compiled for throughput (streams): with this input shape fixed for the first
        STATIC_SHAPES shapes, then one dynamic-shape model for every further shape."""
        with self._lock:
            key: tuple[int, ...] | None = shape if shape in self._throughput or \
                len(self._throughput) < STATIC_SHAPES else None
            if key not in self._throughput:
                config = {k: v for k, v in self._config.items() if k != "NUM_STREAMS"}
                config["PERFORMANCE_HINT"] = "THROUGHPUT"
                model = self._model
                if key is not None:
                    model = self._model.clone()
                    try:
                        model.reshape(list(shape))
                    except RuntimeError:
                        model = self._model
                self._throughput[key] = self._compile(model, config)
            return self._throughput[key]

    def bench_extras(self) -> dict[str, object]:
        return {"openvino_precision_hint": getattr(self, "_hint", None),
                "openvino_graph": getattr(self, "_graph", None),
                **({"openvino_16bit_choice": self._choice} if getattr(self, "_choice", None) else {})}
