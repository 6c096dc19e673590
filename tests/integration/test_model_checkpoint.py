"""Reference model and checkpoint import (docs/design.md section 2)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from popular import popular_forward, popular_state_dict, wrap_checkpoint

from attunet_deploy.checkpoint import FORMAT, convert_state_dict, infer_config, load_checkpoint, save_checkpoint
from attunet_deploy.errors import CheckpointError
from attunet_deploy.models.attunet2d import AttentionUNet, AttentionUNetConfig, count_parameters


def test_parameter_count_matches_popular_attu_net() -> None:
    assert count_parameters(AttentionUNet(AttentionUNetConfig(3, 1, 64))) == 34_878_573
    sd = popular_state_dict(3, 1, 64)
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                   "num_batches_tracked"))) == 34_878_573


@pytest.mark.parametrize("cfg", [(1, 1, 16), (3, 4, 8), (2, 1, 4)])
def test_forward_shape_and_logits(cfg: tuple[int, int, int]) -> None:
    model = AttentionUNet(AttentionUNetConfig(*cfg)).eval()
    x = torch.randn(2, cfg[0], 48, 80)
    with torch.no_grad():
        y = model(x)
        model.head.bias += 10.0
        shifted = model(x)
    assert y.shape == (2, cfg[1], 48, 80)
    # Raw logits: nothing squashes the head's output, so a bias shift passes straight through.
    assert torch.allclose(shifted, y + 10.0, atol=1e-4)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="base_channels"):
        AttentionUNetConfig(3, 1, 0)
    assert AttentionUNetConfig.from_dict({"in_channels": 2, "out_channels": 3, "base_channels": 8, "x": 1}) == \
        AttentionUNetConfig(2, 3, 8)


@pytest.mark.parametrize(("head", "style"), [("Conv_1x1", "bare"), ("Conv", "bare"), ("Conv_1x1", "dataparallel"),
                                             ("Conv", "model")])
def test_popular_layouts_load_with_identical_outputs(tmp_path: Path, head: str, style: str) -> None:
    sd = popular_state_dict(3, 2, 8, head=head, seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap_checkpoint(sd, style), path)
    loaded = load_checkpoint(path)
    assert loaded.config == AttentionUNetConfig(3, 2, 8)
    assert loaded.source == "state_dict"
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours = loaded.module(x)
        ref = popular_forward(sd, x, head=head)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_config_inferred_from_shapes() -> None:
    renamed = convert_state_dict({"module." + k: v for k, v in popular_state_dict(5, 3, 4).items()})
    assert infer_config(renamed) == AttentionUNetConfig(5, 3, 4)
    assert "enc1.conv.0.weight" in renamed and "head.weight" in renamed and "dec5.conv.0.weight" in renamed


def test_own_format_roundtrip(tmp_path: Path) -> None:
    model = AttentionUNet(AttentionUNetConfig(1, 3, 4)).eval()
    save_checkpoint(model, tmp_path / "m.pt", meta={"note": "x"})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == FORMAT and raw["config"]["out_channels"] == 3
    loaded = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    assert loaded.source == "attunet-deploy"


def test_mismatch_error_lists_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    sd = popular_state_dict(1, 1, 8)
    sd.pop("Att3.psi.0.weight")
    sd["Att3.extra.weight"] = torch.zeros(3)
    sd["Up_conv2.conv.0.weight"] = torch.zeros(8, 99, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "1 missing (att3.psi.0.weight)" in msg
    assert "1 unexpected (att3.extra.weight)" in msg
    assert "shape mismatches (dec2.conv.0.weight (8, 99, 3, 3)!=(8, 16, 3, 3))" in msg


def test_other_network_is_refused(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"does not match the Attention U-Net.*missing.*unexpected"):
        load_checkpoint(tmp_path / "other.pth")


class _Pickled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = AttentionUNet(AttentionUNetConfig(1, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_pickled_module_refused_without_flag(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(_Pickled(), path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert loaded.source == "pickle" and loaded.config == AttentionUNetConfig(1, 1, 4)


def test_torchscript_loads_as_is(tmp_path: Path) -> None:
    model = AttentionUNet(AttentionUNetConfig(2, 3, 4)).eval()
    scripted = torch.jit.trace(model, torch.zeros(1, 2, 32, 32))
    scripted.save(str(tmp_path / "m.ts"))
    loaded = load_checkpoint(tmp_path / "m.ts")
    assert loaded.source == "torchscript" and loaded.config == AttentionUNetConfig(2, 3, 4)
    x = torch.randn(1, 2, 48, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-6)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pth")
    with open(tmp_path / "list.pth", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "list.pth")
