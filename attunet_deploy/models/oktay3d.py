"""The paper's own 3D networks (Oktay et al. 2018), written from the authors' public code
(``ozan-oktay/Attention-Gated-Networks``, MIT licence: ``models/networks/unet_CT_multi_att_dsv_3D.py``,
``unet_grid_attention_3D.py``, ``models/networks/utils.py``, ``models/layers/grid_attention_layer.py``).

Module and attribute names follow that code exactly, so the authors' checkpoints load with
``load_state_dict`` as they are (after ``module.`` is stripped and ``{"state_dict": ...}``
unwrapped, see :mod:`attunet_deploy.checkpoint`):

- ``multi_att_dsv`` (``unet_CT_multi_att_dsv_3D``, the pancreas CT network): four 2x2x2 max-pools;
  at levels 2-4 two grid attention gates whose theta conv sub-samples the skip by 2, phi on the
  gating signal, psi upsampled trilinearly, combined by a 1x1x1 conv + BN + ReLU; trilinear
  upsampling in the decoder; deep-supervision heads of levels 2-4 upsampled to full size and fused
  with level 1's by a final 1x1x1 conv.
- ``grid_attention`` (``unet_grid_attention_3D``): (3,3,1) convolutions, (2,2,1) max-pools, one
  gate per level fed by the coarsest gating signal, transposed-conv (or trilinear) upsampling.

The authors index volumes as nibabel does, [N, C, X, Y, Z] (Z = the slice axis). Bundles are
[N, C, D, H, W]; :class:`Oktay3D` transposes to the authors' order inside the graph and back, so a
checkpoint sees exactly the axes it was trained on. ``nn.Upsample(mode="trilinear")`` keeps its
current PyTorch default (``align_corners=False``), as the authors' code does when run today.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VARIANTS = ("multi_att_dsv", "grid_attention")
BASE_FILTERS = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class Oktay3DConfig:
    """Shape of one of the authors' 3D networks."""

    variant: str = "multi_att_dsv"
    in_channels: int = 1
    out_channels: int = 2  # the authors' n_classes
    feature_scale: int = 4
    is_deconv: bool = True  # grid_attention only: transposed conv (True) or trilinear upsampling
    is_batchnorm: bool = True
    attention_dsample: tuple[int, int, int] = (2, 2, 2)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Oktay3DConfig.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("in_channels", "out_channels", "feature_scale"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Oktay3DConfig.{name} must be a positive int, got {value!r}")
        if min(self.filters) < 1:
            raise ValueError(f"feature_scale {self.feature_scale} leaves a level with no channels")

    @property
    def filters(self) -> tuple[int, ...]:
        return tuple(int(f / self.feature_scale) for f in BASE_FILTERS)

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Per-axis divisor of [D, H, W] so that every pooled size lines up again in the decoder."""
        return (16, 16, 16) if self.variant == "multi_att_dsv" else (1, 16, 16)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attention_dsample"] = list(self.attention_dsample)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Oktay3DConfig:
        known: dict[str, Any] = {k: data[k] for k in ("variant", "in_channels", "out_channels", "feature_scale",
                                                      "is_deconv", "is_batchnorm") if k in data}
        if "attention_dsample" in data:
            known["attention_dsample"] = tuple(int(v) for v in data["attention_dsample"])
        return cls(**known)


def _conv_bn_relu(cin: int, cout: int, kernel: Any, stride: Any, padding: Any, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv3d(cin, cout, kernel, stride, padding)]
    if bn:
        layers.append(nn.BatchNorm3d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UnetConv3(nn.Module):
    """Two (conv + BN + ReLU); the authors' default kernel (3,3,1) with padding (1,1,0)."""

    def __init__(self, cin: int, cout: int, bn: bool, kernel_size: Any = (3, 3, 1),
                 padding_size: Any = (1, 1, 0)) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, kernel_size, 1, padding_size, bn)
        self.conv2 = _conv_bn_relu(cout, cout, kernel_size, 1, padding_size, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UnetGridGatingSignal3(nn.Module):
    def __init__(self, cin: int, cout: int, bn: bool) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, (1, 1, 1), (1, 1, 1), (0, 0, 0), bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class GridAttentionBlock3D(nn.Module):
    """Additive grid attention ('concatenation' mode): theta sub-samples the skip by
    ``sub_sample_factor``, phi(g) is resized to theta's grid, psi's sigmoid is upsampled back."""

    def __init__(self, in_channels: int, gating_channels: int, inter_channels: int,
                 sub_sample_factor: tuple[int, int, int] = (2, 2, 2)) -> None:
        super().__init__()
        self.W = nn.Sequential(nn.Conv3d(in_channels, in_channels, 1), nn.BatchNorm3d(in_channels))
        self.theta = nn.Conv3d(in_channels, inter_channels, sub_sample_factor, sub_sample_factor, 0, bias=False)
        self.phi = nn.Conv3d(gating_channels, inter_channels, 1, 1, 0, bias=True)
        self.psi = nn.Conv3d(inter_channels, 1, 1, 1, 0, bias=True)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta_x = self.theta(x)
        phi_g = F.interpolate(self.phi(g), size=theta_x.shape[2:], mode="trilinear")
        f = F.relu(theta_x + phi_g)
        sigm_psi_f = F.interpolate(torch.sigmoid(self.psi(f)), size=x.shape[2:], mode="trilinear")
        return self.W(sigm_psi_f.expand_as(x) * x), sigm_psi_f


class MultiAttentionBlock(nn.Module):
    def __init__(self, in_size: int, gate_size: int, inter_size: int, sub_sample_factor: tuple[int, int, int]) -> None:
        super().__init__()
        self.gate_block_1 = GridAttentionBlock3D(in_size, gate_size, inter_size, sub_sample_factor)
        self.gate_block_2 = GridAttentionBlock3D(in_size, gate_size, inter_size, sub_sample_factor)
        self.combine_gates = nn.Sequential(nn.Conv3d(in_size * 2, in_size, 1, 1, 0), nn.BatchNorm3d(in_size),
                                           nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_1, attention_1 = self.gate_block_1(x, g)
        gate_2, attention_2 = self.gate_block_2(x, g)
        return self.combine_gates(torch.cat([gate_1, gate_2], 1)), torch.cat([attention_1, attention_2], 1)


class UnetUp3CT(nn.Module):
    """Trilinear x2 upsampling, concat with the skip, two 3x3x3 convs (``UnetUp3_CT``)."""

    def __init__(self, in_size: int, out_size: int, bn: bool) -> None:
        super().__init__()
        self.conv = UnetConv3(in_size + out_size, out_size, bn, (3, 3, 3), (1, 1, 1))
        self.up = nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear")

    def forward(self, skip: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(below)], 1))


class UnetUp3(nn.Module):
    """(4,4,1) transposed conv (or (2,2,1) trilinear), concat with the skip, two convs (``UnetUp3``)."""

    def __init__(self, in_size: int, out_size: int, is_deconv: bool, bn: bool) -> None:
        super().__init__()
        self.up: nn.Module
        if is_deconv:
            self.conv = UnetConv3(in_size, out_size, bn)
            self.up = nn.ConvTranspose3d(in_size, out_size, (4, 4, 1), (2, 2, 1), (1, 1, 0))
        else:
            self.conv = UnetConv3(in_size + out_size, out_size, bn)
            self.up = nn.Upsample(scale_factor=(2, 2, 1), mode="trilinear")

    def forward(self, skip: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(below)], 1))


class UnetDsv3(nn.Module):
    def __init__(self, in_size: int, out_size: int, scale_factor: int) -> None:
        super().__init__()
        self.dsv = nn.Sequential(nn.Conv3d(in_size, out_size, 1, 1, 0),
                                 nn.Upsample(scale_factor=scale_factor, mode="trilinear"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dsv(x)


class UNetCTMultiAttDsv3D(nn.Module):
    """``unet_CT_multi_att_dsv_3D``: input and output in the authors' [N, C, X, Y, Z] order."""

    def __init__(self, cfg: Oktay3DConfig) -> None:
        super().__init__()
        f, bn, ds = cfg.filters, cfg.is_batchnorm, cfg.attention_dsample
        k3, p1 = (3, 3, 3), (1, 1, 1)
        self.conv1 = UnetConv3(cfg.in_channels, f[0], bn, k3, p1)
        self.maxpool1 = nn.MaxPool3d((2, 2, 2))
        self.conv2 = UnetConv3(f[0], f[1], bn, k3, p1)
        self.maxpool2 = nn.MaxPool3d((2, 2, 2))
        self.conv3 = UnetConv3(f[1], f[2], bn, k3, p1)
        self.maxpool3 = nn.MaxPool3d((2, 2, 2))
        self.conv4 = UnetConv3(f[2], f[3], bn, k3, p1)
        self.maxpool4 = nn.MaxPool3d((2, 2, 2))
        self.center = UnetConv3(f[3], f[4], bn, k3, p1)
        self.gating = UnetGridGatingSignal3(f[4], f[4], bn)
        self.attentionblock2 = MultiAttentionBlock(f[1], f[2], f[1], ds)
        self.attentionblock3 = MultiAttentionBlock(f[2], f[3], f[2], ds)
        self.attentionblock4 = MultiAttentionBlock(f[3], f[4], f[3], ds)
        self.up_concat4 = UnetUp3CT(f[4], f[3], bn)
        self.up_concat3 = UnetUp3CT(f[3], f[2], bn)
        self.up_concat2 = UnetUp3CT(f[2], f[1], bn)
        self.up_concat1 = UnetUp3CT(f[1], f[0], bn)
        self.dsv4 = UnetDsv3(f[3], cfg.out_channels, 8)
        self.dsv3 = UnetDsv3(f[2], cfg.out_channels, 4)
        self.dsv2 = UnetDsv3(f[1], cfg.out_channels, 2)
        self.dsv1 = nn.Conv3d(f[0], cfg.out_channels, 1)
        self.final = nn.Conv3d(cfg.out_channels * 4, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        center = self.center(self.maxpool4(conv4))
        gating = self.gating(center)
        g_conv4, _ = self.attentionblock4(conv4, gating)
        up4 = self.up_concat4(g_conv4, center)
        g_conv3, _ = self.attentionblock3(conv3, up4)
        up3 = self.up_concat3(g_conv3, up4)
        g_conv2, _ = self.attentionblock2(conv2, up3)
        up2 = self.up_concat2(g_conv2, up3)
        up1 = self.up_concat1(conv1, up2)
        return self.final(torch.cat([self.dsv1(up1), self.dsv2(up2), self.dsv3(up3), self.dsv4(up4)], dim=1))


class UNetGridAttention3D(nn.Module):
    """``unet_grid_attention_3D``: input and output in the authors' [N, C, X, Y, Z] order."""

    def __init__(self, cfg: Oktay3DConfig) -> None:
        super().__init__()
        f, bn, ds = cfg.filters, cfg.is_batchnorm, cfg.attention_dsample
        self.conv1 = UnetConv3(cfg.in_channels, f[0], bn)
        self.maxpool1 = nn.MaxPool3d((2, 2, 1))
        self.conv2 = UnetConv3(f[0], f[1], bn)
        self.maxpool2 = nn.MaxPool3d((2, 2, 1))
        self.conv3 = UnetConv3(f[1], f[2], bn)
        self.maxpool3 = nn.MaxPool3d((2, 2, 1))
        self.conv4 = UnetConv3(f[2], f[3], bn)
        self.maxpool4 = nn.MaxPool3d((2, 2, 1))
        self.center = UnetConv3(f[3], f[4], bn)
        self.gating = UnetGridGatingSignal3(f[4], f[3], bn)
        self.attentionblock2 = GridAttentionBlock3D(f[1], f[3], f[1], ds)
        self.attentionblock3 = GridAttentionBlock3D(f[2], f[3], f[2], ds)
        self.attentionblock4 = GridAttentionBlock3D(f[3], f[3], f[3], ds)
        self.up_concat4 = UnetUp3(f[4], f[3], cfg.is_deconv, bn)
        self.up_concat3 = UnetUp3(f[3], f[2], cfg.is_deconv, bn)
        self.up_concat2 = UnetUp3(f[2], f[1], cfg.is_deconv, bn)
        self.up_concat1 = UnetUp3(f[1], f[0], cfg.is_deconv, bn)
        self.final = nn.Conv3d(f[0], cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        center = self.center(self.maxpool4(conv4))
        gating = self.gating(center)
        g_conv4, _ = self.attentionblock4(conv4, gating)
        g_conv3, _ = self.attentionblock3(conv3, gating)
        g_conv2, _ = self.attentionblock2(conv2, gating)
        up4 = self.up_concat4(g_conv4, center)
        up3 = self.up_concat3(g_conv3, up4)
        up2 = self.up_concat2(g_conv2, up3)
        return self.final(self.up_concat1(conv1, up2))


class Oktay3D(nn.Module):
    """One of the authors' networks, taking and returning [N, C, D, H, W] (the bundle's layout).

    ``net`` is the authors' network unchanged (its state_dict keys are the authors', under ``net.``);
    the axes are reversed on the way in and out, [D, H, W] <-> the authors' [X, Y, Z].
    """

    family = "oktay3d"

    def __init__(self, cfg: Oktay3DConfig) -> None:
        super().__init__()
        self.config = cfg
        self.net = UNetCTMultiAttDsv3D(cfg) if cfg.variant == "multi_att_dsv" else UNetGridAttention3D(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)


def variant_of(keys: set[str]) -> str | None:
    """Which of the authors' networks a state_dict (keys without ``module.``) belongs to, if any."""
    if "final.weight" not in keys or "gating.conv1.0.weight" not in keys:
        return None
    if "attentionblock2.gate_block_1.theta.weight" in keys and "dsv4.dsv.0.weight" in keys:
        return "multi_att_dsv"
    if "attentionblock2.theta.weight" in keys:
        return "grid_attention"
    return None


def infer_config(state: dict[str, torch.Tensor], variant: str) -> Oktay3DConfig:
    """in/out channels and feature_scale from the tensor shapes of the authors' keys."""
    first = state["conv1.conv1.0.weight"]
    head = state["final.weight"]
    width = int(first.shape[0])
    scale = max(1, round(BASE_FILTERS[0] / width))
    ds = tuple(int(s) for s in state[("attentionblock2.gate_block_1.theta.weight" if variant == "multi_att_dsv"
                                      else "attentionblock2.theta.weight")].shape[2:])
    deconv = variant == "grid_attention" and state.get("up_concat1.up.weight") is not None \
        and state["up_concat1.up.weight"].ndim == 5
    bn = "conv1.conv1.1.weight" in state
    return Oktay3DConfig(variant=variant, in_channels=int(first.shape[1]), out_channels=int(head.shape[0]),
                         feature_scale=scale, is_deconv=bool(deconv), is_batchnorm=bn,
                         attention_dsample=ds)  # type: ignore[arg-type]
