"""Reference 2D Attention U-Net (Oktay et al. 2018) in one file.

The module tree mirrors the widely used ``AttU_Net`` code so that its state_dicts map onto
this model by a top-level rename only (see :mod:`attunet_deploy.checkpoint`):

========================  ===========================
popular ``AttU_Net``      this module
========================  ===========================
``Conv1`` .. ``Conv5``    ``enc1`` .. ``enc5``
``Up5`` .. ``Up2``        ``up5`` .. ``up2``
``Att5`` .. ``Att2``      ``att5`` .. ``att2``
``Up_conv5`` ..           ``dec5`` .. ``dec2``
``Conv`` / ``Conv_1x1``   ``head``
========================  ===========================

The network returns logits (no sigmoid/softmax inside); post-processing lives in the bundle.
Spatial sizes must be multiples of :data:`SPATIAL_DIVISOR`; runners pad and crop for other sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: Four 2x2 max-pools: H and W must be divisible by 2**4 for the skip concatenations to line up.
SPATIAL_DIVISOR = 16


@dataclass(frozen=True)
class AttentionUNetConfig:
    """Shape of an Attention U-Net: input channels, output channels (classes), base width."""

    in_channels: int = 3
    out_channels: int = 1
    base_channels: int = 64

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "base_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AttentionUNetConfig.{name} must be a positive int, got {value!r}")

    @property
    def widths(self) -> tuple[int, int, int, int, int]:
        """Feature widths of the five encoder levels."""
        b = self.base_channels
        return (b, 2 * b, 4 * b, 8 * b, 16 * b)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionUNetConfig:
        known = {k: int(data[k]) for k in ("in_channels", "out_channels", "base_channels") if k in data}
        return cls(**known)


class ConvBlock(nn.Module):
    """Two (3x3 conv + BatchNorm + ReLU)."""

    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    """Nearest-neighbour x2 upsample followed by 3x3 conv + BatchNorm + ReLU."""

    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1, bias=True),
            nn.BatchNorm2d(ch_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))``.

    ``g`` is the (upsampled) decoder feature that gates, ``x`` the encoder skip being gated.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        # The popular code passes (F_g, F_l) the other way round; widths are equal there, so
        # its weights load either way, but the gate conv must take the gating width.
        self.W_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, kernel_size=1, stride=1, padding=0, bias=True),
            nn.BatchNorm2d(inter_channels),
        )
        self.W_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, kernel_size=1, stride=1, padding=0, bias=True),
            nn.BatchNorm2d(inter_channels),
        )
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, kernel_size=1, stride=1, padding=0, bias=True),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        psi = self.relu(self.W_g(g) + self.W_x(x))
        return x * self.psi(psi)


class AttentionUNet(nn.Module):
    """2D Attention U-Net returning logits of shape [N, out_channels, H, W]."""

    def __init__(self, config: AttentionUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AttentionUNetConfig()
        w1, w2, w3, w4, w5 = self.config.widths
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.enc1 = ConvBlock(self.config.in_channels, w1)
        self.enc2 = ConvBlock(w1, w2)
        self.enc3 = ConvBlock(w2, w3)
        self.enc4 = ConvBlock(w3, w4)
        self.enc5 = ConvBlock(w4, w5)

        # Gate intermediate widths base*(4, 2, 1) and a fixed 32 at the finest level, as in
        # the popular code, so that its checkpoints (and parameter count) match exactly.
        self.up5 = UpConv(w5, w4)
        self.att5 = AttentionGate(w4, w4, w3)
        self.dec5 = ConvBlock(2 * w4, w4)
        self.up4 = UpConv(w4, w3)
        self.att4 = AttentionGate(w3, w3, w2)
        self.dec4 = ConvBlock(2 * w3, w3)
        self.up3 = UpConv(w3, w2)
        self.att3 = AttentionGate(w2, w2, w1)
        self.dec3 = ConvBlock(2 * w2, w2)
        self.up2 = UpConv(w2, w1)
        self.att2 = AttentionGate(w1, w1, 32)
        self.dec2 = ConvBlock(2 * w1, w1)
        self.head = nn.Conv2d(w1, self.config.out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.enc1(x)
        x2 = self.enc2(self.pool(x1))
        x3 = self.enc3(self.pool(x2))
        x4 = self.enc4(self.pool(x3))
        x5 = self.enc5(self.pool(x4))

        d5 = self.up5(x5)
        d5 = self.dec5(torch.cat((self.att5(g=d5, x=x4), d5), dim=1))
        d4 = self.up4(d5)
        d4 = self.dec4(torch.cat((self.att4(g=d4, x=x3), d4), dim=1))
        d3 = self.up3(d4)
        d3 = self.dec3(torch.cat((self.att3(g=d3, x=x2), d3), dim=1))
        d2 = self.up2(d3)
        d2 = self.dec2(torch.cat((self.att2(g=d2, x=x1), d2), dim=1))
        return self.head(d2)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
