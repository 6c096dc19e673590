"""models/oktay3d.py against the authors' own networks (tests/data/oktay3d_*.npz, made by
tests/data/make_oktay3d_oracle.py from ozan-oktay/Attention-Gated-Networks): their state_dict loads
with strict key and shape checking, the family and config are read from it, and the outputs equal
theirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from attunet_deploy.models.oktay3d import Oktay3D, Oktay3DConfig, infer_config, variant_of  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("variant", ["multi_att_dsv", "grid_attention"])
def test_the_authors_state_dict_loads_and_reproduces_their_output(variant: str) -> None:
    data = np.load(DATA / f"oktay3d_{variant}.npz")
    state = {k[2:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("w:")}
    assert variant_of(set(state)) == variant
    cfg = infer_config(state, variant)
    assert (cfg.in_channels, cfg.out_channels, cfg.feature_scale) == (1, 2, 64)
    model = Oktay3D(cfg).eval()
    model.net.load_state_dict(state, strict=True)
    x = torch.from_numpy(data["input"])  # the authors' [N, C, X, Y, Z]
    with torch.no_grad():
        ours = model(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2).numpy()
    ref = data["output"]
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-5


def test_config_checks_and_round_trip() -> None:
    cfg = Oktay3DConfig(variant="grid_attention", in_channels=1, out_channels=3, feature_scale=16)
    assert Oktay3DConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.divisor == (1, 16, 16) and Oktay3DConfig().divisor == (16, 16, 16)
    for bad in ({"variant": "unet"}, {"in_channels": 0}, {"feature_scale": 128}):
        with pytest.raises(ValueError):
            Oktay3DConfig(**bad)  # type: ignore[arg-type]
    assert variant_of({"conv1.conv1.0.weight"}) is None
