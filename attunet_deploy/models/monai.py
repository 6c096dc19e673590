"""MONAI's ``AttentionUnet`` (2D or 3D), built with MONAI's own class from a checkpoint's state_dict.

MONAI (``pip install 'attunet-deploy[monai]'``) is needed on the export side only. Its arguments
are read off the state_dict's tensor shapes: ``spatial_dims`` from the rank of the first conv,
``in_channels`` and ``channels`` level by level along the nested ``submodule`` keys,
``out_channels`` from the final 1x1 conv, ``kernel_size`` and ``up_kernel_size`` from the conv
shapes. ``strides`` leave no trace in the weights: 2 per level unless given
(``export --monai-args "strides=2,2,1"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: Keys every MONAI AttentionUnet state_dict has (level 0's first conv, level 1's attention gate).
_FIRST = "model.0.conv.0.conv.weight"
_GATE = "model.1.attention.W_g.0.conv.weight"


@dataclass(frozen=True)
class MonaiConfig:
    """Arguments of ``monai.networks.nets.AttentionUnet``."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    kernel_size: int = 3
    up_kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels {list(self.channels)}: at least two positive widths")
        if len(self.strides) != len(self.channels) - 1 or any(s < 1 for s in self.strides):
            raise ValueError(f"strides {list(self.strides)}: one positive stride per level below the first "
                             f"({len(self.channels) - 1} for channels {list(self.channels)})")

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per-axis divisor of the input's spatial size (the product of the strides)."""
        return (math.prod(self.strides),) * self.spatial_dims

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"], d["strides"] = list(self.channels), list(self.strides)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MonaiConfig:
        return cls(spatial_dims=int(data["spatial_dims"]), in_channels=int(data["in_channels"]),
                   out_channels=int(data["out_channels"]), channels=tuple(int(c) for c in data["channels"]),
                   strides=tuple(int(s) for s in data["strides"]), kernel_size=int(data.get("kernel_size", 3)),
                   up_kernel_size=int(data.get("up_kernel_size", 3)))


def is_monai_attention_unet(keys: set[str]) -> bool:
    return _FIRST in keys and _GATE in keys


def parse_monai_args(text: str | None) -> dict[str, tuple[int, ...]]:
    """``"channels=8,16,32,64 strides=2,2,2"`` -> {"channels": (8, 16, 32, 64), "strides": (2, 2, 2)}."""
    out: dict[str, tuple[int, ...]] = {}
    for part in (text or "").replace(";", " ").split():
        key, sep, value = part.partition("=")
        if not sep or key not in ("channels", "strides"):
            raise ValueError(f"--monai-args {part!r}: use channels=A,B,... and/or strides=A,B,...")
        try:
            out[key] = tuple(int(v) for v in value.split(",") if v)
        except ValueError:
            raise ValueError(f"--monai-args {part!r}: comma-separated integers expected") from None
    return out


def infer_config(state: Mapping[str, Any], overrides: Mapping[str, tuple[int, ...]] | None = None) -> MonaiConfig:
    """The AttentionUnet arguments a state_dict (``module.`` already stripped) was made with."""
    first = state[_FIRST]
    channels = [int(first.shape[0])]
    prefix = "model.1"
    while True:  # each level below holds a conv block at submodule.0 and the next level at submodule.1
        key = f"{prefix}.submodule.0.conv.0.conv.weight"
        if key in state:
            channels.append(int(state[key].shape[0]))
            prefix += ".submodule.1"
            continue
        key = f"{prefix}.submodule.conv.0.conv.weight"  # the bottom level has no gate below it
        if key in state:
            channels.append(int(state[key].shape[0]))
        break
    head = state.get("model.2.conv.weight")  # the final 1x1 convolution
    if head is None:
        raise ValueError("no model.2.conv.weight: not a MONAI AttentionUnet state_dict (its final convolution is "
                         "missing)")
    up = state.get("model.1.upconv.up.conv.weight")
    given = dict(overrides or {})
    if "channels" in given and tuple(given["channels"]) != tuple(channels):
        raise ValueError(f"--monai-args channels {list(given['channels'])} disagree with the checkpoint's "
                         f"{channels}")
    return MonaiConfig(spatial_dims=first.ndim - 2, in_channels=int(first.shape[1]),
                       out_channels=int(head.shape[0]), channels=tuple(channels),
                       strides=tuple(given.get("strides") or (2,) * (len(channels) - 1)),
                       kernel_size=int(first.shape[-1]), up_kernel_size=int(up.shape[-1]) if up is not None else 3)


def build(cfg: MonaiConfig) -> Any:  # -> monai.networks.nets.AttentionUnet
    """MONAI's own AttentionUnet for ``cfg`` (ImportError names the extra when MONAI is missing)."""
    try:
        from monai.networks.nets import AttentionUnet
    except ImportError as exc:
        raise ImportError("MONAI checkpoints need MONAI: pip install 'attunet-deploy[monai]'") from exc
    return AttentionUnet(spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                         channels=cfg.channels, strides=cfg.strides, kernel_size=cfg.kernel_size,
                         up_kernel_size=cfg.up_kernel_size)


class MonaiAttentionUnet(nn.Module):
    """MONAI's AttentionUnet under ``.net`` (its state_dict keys are MONAI's, under ``net.``) with the
    :class:`MonaiConfig` it was built from (what checkpoints and bundles keep); MONAI's own forward."""

    family = "monai"

    def __init__(self, cfg: MonaiConfig) -> None:
        super().__init__()
        self.config = cfg
        self.net = build(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
