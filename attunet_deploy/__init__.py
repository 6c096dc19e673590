"""attunet-deploy: Attention U-Net from a PyTorch checkpoint to a verified edge deployment.

Importing this package never imports torch; ``load_runner`` runs bundles on ONNX Runtime or
TensorRT with numpy alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bundle import Bundle
from .errors import AttDeployError, BackendUnavailable, BundleError, CheckpointError, InputError, VerificationFailed
from .runtimes.base import Runner, available_backends, load_runner

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
