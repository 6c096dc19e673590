"""PyTorch reference runner: the bundle's weights (or TorchScript file) on CPU or CUDA.

This is the reference every other backend is verified against; it runs FP32 only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attunet_deploy.bundle import TORCHSCRIPT_FILE, WEIGHTS_FILE, Bundle
from attunet_deploy.environment import has_module
from attunet_deploy.errors import BackendUnavailable
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import register


@register
class TorchRunner(Runner):
    """Options: ``device`` ("cpu", "cuda", or "auto": CUDA when torch sees a GPU); ``threads``
    (torch's intra-op threads, process-wide: torch has no per-module setting)."""

    backend = "torch"
    precisions = ("fp32",)

    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        if not has_module("torch"):
            return "torch is not installed (pip install 'attunet-deploy[torch]')"
        if not (bundle.has(WEIGHTS_FILE) or bundle.has(TORCHSCRIPT_FILE)):
            return f"bundle has neither {WEIGHTS_FILE} nor {TORCHSCRIPT_FILE}"
        return None

    def _activate(self) -> None:
        import torch

        want = self.options.get("device", "cpu")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch was asked for CUDA but torch.cuda.is_available() is False")
        self._torch = torch
        self._device = torch.device(want)
        if self._device.type == "cuda":
            strict_fp32(torch)
        threads = int(self.options.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)  # same thread count as the other CPU backends
        # Loaded from the bytes whose sha256 was checked, with weights_only=True.
        if self.bundle.has(WEIGHTS_FILE):
            from attunet_deploy.checkpoint import load_checkpoint_bytes

            module: Any = load_checkpoint_bytes(self.bundle.read_artifact(WEIGHTS_FILE), WEIGHTS_FILE).module
        else:
            import io

            module = torch.jit.load(io.BytesIO(self.bundle.read_artifact(TORCHSCRIPT_FILE)), map_location="cpu")
        self._module = module.eval().to(self._device)

    def _deactivate(self) -> None:
        self._module = None

    @property
    def device(self) -> str:
        dev = getattr(self, "_device", None)
        if dev is None or dev.type == "cpu":
            return "cpu"
        return f"{dev} ({self._torch.cuda.get_device_name(dev)})"

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self._module(torch.from_numpy(x).to(self._device))
        return y.float().cpu().numpy()


def strict_fp32(torch: Any) -> None:
    """FP32 that is FP32 on CUDA: PyTorch runs cuDNN convolutions in TF32 by default on Ampere and
    newer (10-bit mantissa), which is not a reference (measured on an H100 with the 3D demo: rel L2
    1.25e-04 against the CPU with TF32, above the FP32 tolerance). Process-wide, as PyTorch's flags are."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
