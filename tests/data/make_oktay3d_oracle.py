"""Make tests/data/oktay3d_*.npz: the authors' own 3D networks as the oracle for models/oktay3d.py.

    git clone https://github.com/ozan-oktay/Attention-Gated-Networks /tmp/agn
    python tests/data/make_oktay3d_oracle.py /tmp/agn

Builds ``unet_CT_multi_att_dsv_3D`` and ``unet_grid_attention_3D`` from that checkout (their
``init_weights`` replaced by a no-op: the weights are seeded below), with feature_scale 64 (widths 1..16) so the
files stay small, Kaiming-normal convolutions, non-trivial BatchNorm statistics, and saves per network: every state_dict
tensor (``w:<key>``), one input in the authors' [N, C, X, Y, Z] order (``input``) and their
network's output for it (``output``).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main(repo: str) -> None:
    work = Path(tempfile.mkdtemp())
    for rel in ("models/networks/utils.py", "models/networks/unet_CT_multi_att_dsv_3D.py",
                "models/networks/unet_grid_attention_3D.py", "models/layers/grid_attention_layer.py"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text((Path(repo) / rel).read_text())
    for pkg in ("models", "models/networks", "models/layers"):
        (work / pkg / "__init__.py").write_text("")
    (work / "models" / "networks_other.py").write_text("def init_weights(m, init_type='normal'):\n    pass\n")
    sys.path.insert(0, str(work))
    warnings.simplefilter("ignore")
    from models.networks.unet_CT_multi_att_dsv_3D import unet_CT_multi_att_dsv_3D
    from models.networks.unet_grid_attention_3D import unet_grid_attention_3D

    for name, ctor in (("multi_att_dsv", unet_CT_multi_att_dsv_3D), ("grid_attention", unet_grid_attention_3D)):
        torch.manual_seed(3)
        net = ctor(feature_scale=64, n_classes=2, in_channels=1).eval()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
                torch.nn.init.kaiming_normal_(m.weight)
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        x = torch.randn(1, 1, 16, 16, 16 if name == "multi_att_dsv" else 8)
        with torch.no_grad():
            y = net(x)
        arrays = {f"w:{k}": v.numpy() for k, v in net.state_dict().items()}
        np.savez_compressed(HERE / f"oktay3d_{name}.npz", input=x.numpy(), output=y.numpy(), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
