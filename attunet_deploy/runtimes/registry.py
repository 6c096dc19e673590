"""The backend registry: every backend name, the module that implements it, and the one rule
for "can this backend run this bundle at this precision here" (:func:`check`)."""

from __future__ import annotations

import importlib

from attunet_deploy.bundle import PRECISIONS, Bundle
from attunet_deploy.errors import BackendUnavailable, InputError
from attunet_deploy.runtimes.base import Runner

#: backend name -> module that registers it (imported only when the backend is asked for,
#: so importing this package never pulls in torch, onnxruntime or tensorrt).
BACKEND_MODULES = {
    "torch": "attunet_deploy.runtimes.torch_runner",
    "ort": "attunet_deploy.runtimes.onnxruntime",
    "ort-cuda": "attunet_deploy.runtimes.onnxruntime",
    "ort-trt": "attunet_deploy.runtimes.onnxruntime",
    "trt": "attunet_deploy.runtimes.tensorrt",
    "ov": "attunet_deploy.runtimes.openvino",
    "triton": "attunet_deploy.runtimes.triton",
}
#: Every backend, in the order tables list them.
BACKENDS = tuple(BACKEND_MODULES)
#: Backends that need a served model's URL: ``all`` leaves them out (ask for them by name).
NEEDS_URL = ("triton",)

_REGISTRY: dict[str, type[Runner]] = {}


def register(cls: type[Runner]) -> type[Runner]:
    """Class decorator: make ``cls`` available under ``cls.backend``."""
    _REGISTRY[cls.backend] = cls
    return cls


def runner_class(backend: str) -> type[Runner]:
    """The Runner class of ``backend`` (imports its module on first use)."""
    if backend not in BACKEND_MODULES:
        raise InputError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKEND_MODULES)}")
    if backend not in _REGISTRY:
        try:
            importlib.import_module(BACKEND_MODULES[backend])
        except ImportError as exc:
            raise BackendUnavailable(f"backend {backend} cannot be imported: {exc}") from exc
    return _REGISTRY[backend]


def check(bundle: Bundle, backend: str, precision: str) -> str | None:
    """None when ``backend`` can plausibly run ``bundle`` at ``precision`` here, else the reason.

    Cheap checks only; some failures (an ONNX Runtime provider falling back to CPU) are found
    only by ``activate`` and raised there as BackendUnavailable.
    """
    try:
        cls = runner_class(backend)
    except BackendUnavailable as exc:
        return str(exc)
    if precision not in cls.precisions:
        return f"{backend} runs {', '.join(cls.precisions)} only"
    return cls.availability(bundle, precision)


def runs_precision(backend: str, precision: str) -> bool:
    """Whether ``backend`` has ``precision`` at all (torch runs fp32 only), without importing it."""
    return not (backend == "torch" and precision != "fp32")


def expand(backends: list[str] | tuple[str, ...], precisions: list[str] | tuple[str, ...] = ("fp32",),
           *, allow_auto: bool = False, keep_unrunnable: bool = False) -> list[tuple[str, str]]:
    """(backend, precision) pairs for a selection: ``all`` means every backend but those that need
    a URL, or every precision. Pairs a backend does not have (torch at fp16) are left out, unless
    ``keep_unrunnable`` and one precision was asked for (the caller then reports why)."""
    names = [b for b in BACKENDS if b not in NEEDS_URL] if "all" in backends else list(backends)
    precs = list(PRECISIONS) if "all" in precisions else list(precisions)
    for b in names:
        if b not in BACKEND_MODULES and not (allow_auto and b == "auto"):
            raise InputError(f"unknown backend {b!r}; choose all or one of {', '.join(BACKEND_MODULES)}")
    for p in precs:
        if p not in PRECISIONS:
            raise InputError(f"unknown precision {p!r}; choose all or one of {', '.join(PRECISIONS)}")
    return [(b, p) for b in names for p in precs if runs_precision(b, p) or (keep_unrunnable and len(precs) == 1)]


def available_backends(bundle: Bundle, precision: str = "fp32") -> dict[str, str | None]:
    """backend -> None if it can run this bundle/precision here, else the reason."""
    return {backend: check(bundle, backend, precision) for backend in BACKENDS}
