"""attunet-deploy: Attention U-Net from a PyTorch checkpoint to a verified edge deployment.

Importing this package never imports torch; ``load_runner`` runs bundles on ONNX Runtime or
TensorRT with numpy alone.
"""

from __future__ import annotations

import os
from typing import Any

from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import (
    AttDeployError,
    BackendUnavailable,
    BundleError,
    CheckpointError,
    InputError,
    VerificationFailed,
)
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import available_backends
from attunet_deploy.runtimes.select import load_runner as _load_runner
from attunet_deploy.version import __version__

__all__ = [
    "AttDeployError",
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "CheckpointError",
    "InputError",
    "Runner",
    "VerificationFailed",
    "__version__",
    "available_backends",
    "load_runner",
]


def load_runner(bundle: str | os.PathLike[str] | Bundle, backend: str = "auto", precision: str = "fp32",
                **options: Any) -> Runner:
    """The one entry point: a runner for ``bundle`` on ``backend`` at ``precision``.

    ``backend="auto"`` picks TensorRT > ONNX Runtime CUDA > OpenVINO (only where measured faster
    than ONNX Runtime CPU here) > ONNX Runtime CPU by what this machine can run.
    ``precision="best"`` picks the fastest precision whose verification on the golden set passes
    on this machine (measured once per machine and graphs, then cached; ``runner.precision`` says
    which). Raises BackendUnavailable (with the reason) when the backend cannot run here and
    InputError/BundleError for a bad bundle or argument. The runner is activated lazily on first
    use, or explicitly with ``with`` / ``activate()``.
    """
    if precision == "best":
        from attunet_deploy.judge.best import resolve_best

        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        choice = resolve_best(b, backend, **options)
        return _load_runner(b, choice.backend, choice.precision, **options)
    return _load_runner(bundle, backend, precision, **options)
