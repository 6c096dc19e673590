"""models/monai.py: MONAI's AttentionUnet rebuilt from nothing but its state_dict (2D and 3D),
with MONAI's own class, and run to the same outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nets = pytest.importorskip("monai.networks.nets")

from attunet_deploy.models.monai import (  # noqa: E402
    MonaiConfig,
    build,
    infer_config,
    is_monai_attention_unet,
    parse_monai_args,
)


@pytest.mark.parametrize("dims, channels, strides, shape", [
    (3, (4, 8, 16, 32), (2, 2, 2), (1, 1, 16, 24, 32)),
    (2, (8, 16, 32), (2, 2), (2, 1, 32, 48)),
    (3, (4, 8, 16), (2, 1), (1, 1, 8, 12, 16)),  # a stride of 1 leaves no trace: given with --monai-args
])
def test_rebuilt_from_its_state_dict(dims: int, channels: tuple[int, ...], strides: tuple[int, ...],
                                     shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    original = nets.AttentionUnet(spatial_dims=dims, in_channels=1, out_channels=3, channels=channels,
                                  strides=strides).eval()
    for m in original.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = original.state_dict()
    assert is_monai_attention_unet(set(state))
    overrides = parse_monai_args(f"strides={','.join(map(str, strides))}") if 1 in strides else {}
    cfg = infer_config(state, overrides)
    assert (cfg.spatial_dims, cfg.in_channels, cfg.out_channels, cfg.channels, cfg.strides) == \
        (dims, 1, 3, channels, strides)
    rebuilt = build(cfg).eval()
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))
    assert MonaiConfig.from_dict(cfg.to_dict()) == cfg


def test_arguments_are_checked() -> None:
    assert parse_monai_args("channels=8,16,32 strides=2,2") == {"channels": (8, 16, 32), "strides": (2, 2)}
    for bad in ("depth=3", "strides=2,x", "strides"):
        with pytest.raises(ValueError, match="--monai-args"):
            parse_monai_args(bad)
    with pytest.raises(ValueError, match="strides"):
        MonaiConfig(3, 1, 2, (4, 8, 16), (2,))
    net = nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,))
    state = net.state_dict()
    with pytest.raises(ValueError, match="disagree"):
        infer_config(state, {"channels": (8, 16)})
