"""Train the bundled 3D demo model: the paper's ``unet_CT_multi_att_dsv_3D`` (feature_scale 16, one
output channel) on synthetic CT volumes (``demo/phantom3d.py``, CT window 40/400).

Reproduce the committed weights (2 shared CPU cores)::

    python -m attunet_deploy.demo.train3d --minutes 20 --out attunet_deploy/demo/oktay3d_demo.pt

Training volumes come from seed 0 (generated on the fly, never repeated), the reported held-out
Dice from 16 volumes of seed 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attunet_deploy.checkpoint import save_checkpoint
from attunet_deploy.demo import HELDOUT_SEED, TRAIN_SEED
from attunet_deploy.demo.phantom import window
from attunet_deploy.demo.phantom3d import make_volumes
from attunet_deploy.models.oktay3d import Oktay3D, Oktay3DConfig


@torch.no_grad()
def heldout_dice(model: Oktay3D, images: np.ndarray, labels: np.ndarray) -> float:
    """Mean Dice (per volume) of thresholded predictions against the phantom labels."""
    model.eval()
    scores = []
    for i in range(len(images)):
        pred = (model(torch.from_numpy(images[i:i + 1])) > 0).numpy()[0, 0]
        lab = labels[i].astype(bool)
        total = pred.sum() + lab.sum()
        scores.append(1.0 if total == 0 else 2.0 * (pred & lab).sum() / total)
    return float(np.mean(scores))


def train(out: Path, minutes: float = 20.0, batch: int = 2, lr: float = 3e-3, seed: int = 1234) -> float:
    torch.manual_seed(seed)
    model = Oktay3D(Oktay3DConfig(variant="multi_att_dsv", in_channels=1, out_channels=1, feature_scale=16))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    v_hu, vy = make_volumes(16, seed=HELDOUT_SEED)
    v = window(v_hu)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        model.train()
        hu, y = make_volumes(batch, seed=TRAIN_SEED * 7919 + step)  # a fresh pair of volumes every step
        x, t = torch.from_numpy(window(hu)), torch.from_numpy(y[:, None].astype(np.float32))
        logits = model(x)
        prob = torch.sigmoid(logits)
        axes = (1, 2, 3, 4)
        dice = 1 - (2 * (prob * t).sum(dim=axes) + 1) / (prob.sum(dim=axes) + t.sum(dim=axes) + 1)
        loss = dice.mean() + F.binary_cross_entropy_with_logits(logits, t, pos_weight=torch.tensor(5.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if step == int(0.7 * minutes * 60 / max(1e-6, (time.time() - t0) / step)):
            for g in opt.param_groups:
                g["lr"] = lr / 5  # settle for the last part of the budget
    score = heldout_dice(model, v, vy)
    save_checkpoint(model, out, meta={"trained": f"{step} steps, {minutes:g} min budget, phantom3d seed {TRAIN_SEED}",
                                      "heldout_dice": f"{score:.4f}"})
    print(f"{step} steps in {time.time() - t0:.0f} s; held-out Dice {score:.4f}; wrote {out}")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("oktay3d_demo.pt"))
    parser.add_argument("--minutes", type=float, default=20.0)
    args = parser.parse_args()
    train(args.out, minutes=args.minutes)


if __name__ == "__main__":
    main()
