"""Reference networks (torch), one module per family: ``attunet2d`` is the popular 2D ``AttU_Net``."""

from __future__ import annotations

from attunet_deploy.models.attunet2d import SPATIAL_DIVISOR, AttentionUNet, AttentionUNetConfig, count_parameters

__all__ = ["SPATIAL_DIVISOR", "AttentionUNet", "AttentionUNetConfig", "count_parameters"]
