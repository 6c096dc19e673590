"""The numpy sliding window's own rules (MONAI's, checked against MONAI itself in
tests/integration/test_sliding_window_monai.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from attunet_deploy.bundle.spec import SlidingWindow
from attunet_deploy.errors import InputError
from attunet_deploy.window import importance_map, sliding_window, window_starts


@pytest.mark.parametrize("size, roi, overlap", [(96, 96, 0.5), (100, 32, 0.5), (33, 32, 0.25), (200, 64, 0.0),
                                                (70, 16, 0.9)])
def test_windows_cover_the_axis_and_end_at_its_border(size: int, roi: int, overlap: float) -> None:
    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0 and starts[-1] + roi == size and starts == sorted(starts)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + roi] = True
    assert covered.all()
    assert all(b - a <= max(int(roi * (1 - overlap)), 1) for a, b in itertools.pairwise(starts))


def test_gaussian_map_is_symmetric_peaked_and_clamped() -> None:
    w = importance_map(SlidingWindow((9, 16, 16), mode="gaussian", sigma_scale=0.125))
    assert w.shape == (9, 16, 16) and w.dtype == np.float32
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])
    assert w[4, 7, 7] == w.max() and w.min() >= 1e-3
    assert (importance_map(SlidingWindow((4, 4), mode="constant")) == 1).all()
    with pytest.raises(InputError, match="mode"):
        SlidingWindow((4, 4), mode="median")


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_a_pointwise_predictor_is_reproduced_exactly(mode: str) -> None:
    """Blending normalises by the summed weights: a per-voxel function comes back unchanged,
    whatever the overlap, including axes shorter than the window (padded, then cropped)."""
    x = np.random.default_rng(0).standard_normal((2, 1, 20, 45, 13)).astype(np.float32)
    out = sliding_window(lambda w: np.concatenate([w, 2 * w], axis=1), x,
                         SlidingWindow((16, 16, 16), overlap=0.5, mode=mode, batch=3))
    assert out.shape == (2, 2, 20, 45, 13)
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, 1], 2 * x[:, 0], rtol=1e-5, atol=1e-6)


def test_windows_are_batched_and_counted() -> None:
    seen: list[int] = []
    x = np.zeros((1, 1, 64, 64, 64), np.float32)
    sliding_window(lambda w: (seen.append(len(w)), w)[1], x, SlidingWindow((32, 32, 32), overlap=0.5, batch=4))
    assert sum(seen) == 27 and max(seen) == 4  # 3 starts per axis (0, 16, 32)


def test_bad_settings_and_shapes_are_refused() -> None:
    x = np.zeros((1, 1, 8, 8, 8), np.float32)
    for kwargs, match in [({"overlap": 1.0}, "overlap"), ({"mode": "mean"}, "mode"), ({"batch": 0}, "batch"),
                          ({"sigma_scale": 0.0}, "sigma_scale")]:
        with pytest.raises(InputError, match=match):
            SlidingWindow((8, 8, 8), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="does not match"):
        sliding_window(lambda w: w, x[0], SlidingWindow((8, 8, 8)))
    with pytest.raises(InputError, match="returned"):
        sliding_window(lambda w: w[:, :, :4], x, SlidingWindow((8, 8, 8)))
