"""attunet-deploy: Attention U-Net from a PyTorch checkpoint to a verified edge deployment.

Importing this package never imports torch; ``load_runner`` runs bundles on ONNX Runtime or
TensorRT with numpy alone.
"""

from __future__ import annotations

from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import (
    AttDeployError,
    BackendUnavailable,
    BundleError,
    CheckpointError,
    InputError,
    VerificationFailed,
)
from attunet_deploy.loader import load_runner
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import available_backends
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
