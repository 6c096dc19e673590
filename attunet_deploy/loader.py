"""The one entry point: :func:`load_runner`, and :func:`resolve` of what ``backend="auto"`` and
``precision="best"`` mean on this machine (the CLI, predict and the DICOM node use the same).

``auto`` picks TensorRT > ONNX Runtime CUDA > OpenVINO (only where measured faster than ONNX Runtime
CPU here) > ONNX Runtime CPU (``runtimes/select.py``). ``best`` is the fastest precision whose
verification on the golden set passes on this machine (``judge/best.py``: measured once, cached).
"""

from __future__ import annotations

import os
from typing import Any

from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.select import open_runner, resolve_auto


def resolve(bundle: Bundle, backend: str = "auto", precision: str = "fp32", reporter: Reporter | None = None,
            **options: Any) -> tuple[str, str, str | None]:
    """(backend, precision, how best was chosen or None): ``best`` resolved to a precision (and the
    backend ``auto`` picks for it); ``auto`` left to :func:`load_runner` otherwise."""
    if precision != "best":
        return backend, precision, None
    from attunet_deploy.judge.best import resolve_best

    choice = resolve_best(bundle, backend, reporter=reporter, **options)
    return choice.backend, choice.precision, choice.describe()


def load_runner(bundle: str | os.PathLike[str] | Bundle, backend: str = "auto", precision: str = "fp32",
                **options: Any) -> Runner:
    """A runner for ``bundle`` on ``backend`` at ``precision`` (``auto``/``best`` as the module says).

    Raises BackendUnavailable (with the reason) when the backend cannot run here and
    InputError/BundleError for a bad bundle or argument. The runner is activated lazily on first
    use, or explicitly with ``with`` / ``activate()``; ``runner.precision`` says which precision
    ``best`` chose.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    backend, precision, _ = resolve(b, backend, precision, **options)
    if backend == "auto":
        backend = resolve_auto(b, precision)
    return open_runner(b, backend, precision, **options)
