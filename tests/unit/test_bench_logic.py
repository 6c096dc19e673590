"""Benchmark statistics and shape parsing (no timing assertions)."""

from __future__ import annotations

import numpy as np
import pytest

from attunet_deploy.errors import InputError
from attunet_deploy.judge.bench import coefficient_of_variation, latency_stats
from attunet_deploy.preprocess import parse_shape


def test_latency_stats_by_hand() -> None:
    s = latency_stats([0.001, 0.002, 0.003, 0.004, 0.010])  # ms: 1 2 3 4 10
    assert s["mean"] == pytest.approx(4.0)
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(10.0)
    assert s["p50"] == pytest.approx(3.0)
    # linear interpolation: rank 0.9*4 = 3.6 -> 4 + 0.6*(10-4) = 7.6
    assert s["p90"] == pytest.approx(7.6)
    assert s["p99"] == pytest.approx(4 + 0.96 * 6)
    assert s["std"] == pytest.approx(np.sqrt(((1 - 4) ** 2 + 4 + 1 + 0 + 36) / 5))
    assert coefficient_of_variation(s) == pytest.approx(s["std"] / 4.0)


def test_latency_stats_are_ordered() -> None:
    s = latency_stats(np.random.default_rng(0).gamma(2.0, 0.01, 200))
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    with pytest.raises(InputError):
        latency_stats([])


def test_parse_shape() -> None:
    assert parse_shape("1x3x256x256") == (1, 3, 256, 256)
    assert parse_shape("2X1X100X75", channels=1) == (2, 1, 100, 75)
    for bad in ("1x3x256", "axbxcxd", "1x3x0x5", "", "1x3x-2x4"):
        with pytest.raises(InputError, match="bad shape"):
            parse_shape(bad)
    with pytest.raises(InputError, match="model takes 1"):
        parse_shape("1x3x64x64", channels=1)
