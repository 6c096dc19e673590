"""The numpy sliding window against MONAI's own ``sliding_window_inference`` (the oracle): same
predictor, roi, overlap, mode and sigma_scale; relative L2 <= 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
inferers = pytest.importorskip("monai.inferers")

from attunet_deploy.bundle.spec import SlidingWindow  # noqa: E402
from attunet_deploy.window import sliding_window  # noqa: E402


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, 3, 3, padding=1))  # position-dependent near window borders
    return net.eval()


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape, roi, overlap, batch", [
    ((1, 2, 40, 56, 48), (24, 32, 32), 0.5, 4),
    ((2, 2, 20, 70, 33), (32, 32, 32), 0.25, 3),  # D shorter than the window: padded, then cropped
    ((1, 2, 32, 32, 32), (32, 32, 32), 0.5, 1),   # exactly one window
])
def test_matches_monai(mode: str, shape: tuple[int, ...], roi: tuple[int, ...], overlap: float, batch: int) -> None:
    net = _net()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.inference_mode():
        ref = inferers.sliding_window_inference(torch.from_numpy(x), roi, batch, net, overlap=overlap, mode=mode,
                                                sigma_scale=0.125).numpy()
        ours = sliding_window(lambda w: net(torch.from_numpy(w)).numpy(), x,
                              SlidingWindow(roi, overlap=overlap, mode=mode, sigma_scale=0.125, batch=batch))
    assert ours.shape == ref.shape
    assert _rel_l2(ours, ref) <= 1e-5
