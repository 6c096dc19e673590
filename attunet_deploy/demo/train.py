"""Train the bundled demo model: AttentionUNet(in 1, out 1, base 16) on CT phantoms.

Reproduce the committed weights in two stages (2 shared CPU cores)::

    # stage 1, 27 minutes: 128x128 phantoms (held-out Dice 0.981 at 128x128)
    python -m attunet_deploy.demo.train --out /tmp/stage1.pt
    # stage 2, about 25 minutes: continue at 128, 256 and 512 (crops), so the model holds its Dice
    # at the sizes CT comes in (the anatomy of a phantom scales with the image)
    python -m attunet_deploy.demo.train --init /tmp/stage1.pt --multiscale \
        --out attunet_deploy/demo/attunet_demo.pt

Training data: phantoms of seed 0 (training) and seed 1 (held out for the reported Dice).
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
from attunet_deploy.demo.phantom import DEMO_SIZE, make_phantom, make_phantoms, window
from attunet_deploy.models.attunet2d import AttentionUNet, AttentionUNetConfig


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    denom = prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


@torch.no_grad()
def heldout_dice(model: AttentionUNet, images: np.ndarray, labels: np.ndarray, batch: int = 25) -> float:
    """Mean Dice of thresholded predictions against phantom labels."""
    model.eval()
    scores: list[float] = []
    for i in range(0, len(images), batch):
        pred = (model(torch.from_numpy(images[i:i + batch])) > 0).numpy()[:, 0]
        lab = labels[i:i + batch].astype(bool)
        inter = (pred & lab).sum(axis=(1, 2))
        total = pred.sum(axis=(1, 2)) + lab.sum(axis=(1, 2))
        scores.extend(np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1)))
    return float(np.mean(scores))


def train(out: Path, samples: int = 2400, epochs: int = 5, batch: int = 16, lr: float = 2e-3,
          seed: int = 1234, heldout: int = 200) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    x_hu, y = make_phantoms(samples, seed=TRAIN_SEED, size=DEMO_SIZE)
    x = window(x_hu)
    v_hu, vy = make_phantoms(heldout, seed=HELDOUT_SEED, size=DEMO_SIZE)
    vx = window(v_hu)
    print(f"data: {samples} train / {heldout} held-out phantoms in {time.time() - t0:.1f}s", flush=True)

    model = AttentionUNet(AttentionUNetConfig(in_channels=1, out_channels=1, base_channels=16))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (samples // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(samples)
        losses = []
        for i in range(0, samples - batch + 1, batch):
            idx = order[i:i + batch]
            xb = torch.from_numpy(x[idx])
            yb = torch.from_numpy(y[idx, None].astype(np.float32))
            if rng.random() < 0.5:  # mild augmentation: the phantom is left/right symmetric enough
                xb, yb = xb.flip(-1), yb.flip(-1)
            logits = model(xb)
            loss = F.binary_cross_entropy_with_logits(logits, yb) + dice_loss(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        d = heldout_dice(model, vx, vy)
        print(f"epoch {epoch + 1}/{epochs} loss {np.mean(losses):.4f} held-out Dice {d:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    dice = heldout_dice(model, vx, vy)
    save_checkpoint(model, out, meta={
        "trained_on": f"{samples} phantoms seed {TRAIN_SEED}, {epochs} epochs",
        "heldout_dice": f"{dice:.4f}",
        "preprocessing": "CT window level 40 width 400 -> [0, 1]",
    })
    print(f"held-out Dice on {heldout} phantoms: {dice:.4f}; wrote {out} ({time.time() - t0:.0f}s)")
    return dice


def _crop(hu: np.ndarray, lab: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop`` x ``crop`` window holding the target (the model must see it large and in context)."""
    h, w = lab.shape
    ys, xs = np.nonzero(lab)
    cy = int(np.clip(rng.integers(ys.min(), ys.max() + 1) + rng.integers(-crop // 4, crop // 4 + 1), 0, h - 1))
    cx = int(np.clip(rng.integers(xs.min(), xs.max() + 1) + rng.integers(-crop // 4, crop // 4 + 1), 0, w - 1))
    y0 = int(np.clip(cy - crop // 2, 0, h - crop))
    x0 = int(np.clip(cx - crop // 2, 0, w - crop))
    return hu[y0:y0 + crop, x0:x0 + crop], lab[y0:y0 + crop, x0:x0 + crop]


def multiscale(init: Path, out: Path, steps: int = 420, lr: float = 6e-4, seed: int = 4321) -> dict[int, float]:
    """Stage 2: continue from ``init`` on batches at 128 (full), 256 (full) and 512 (256-crops
    around the target), BatchNorm statistics frozen. Returns the held-out Dice per size."""
    from attunet_deploy.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    model = load_checkpoint(init).module
    assert isinstance(model, AttentionUNet)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    plan = {128: 16, 256: 6, 512: 6}  # size -> batch (512: crops of 256)
    sizes = list(plan)
    counter = 0
    for step in range(steps):
        size = sizes[step % 3]
        xs, ys = [], []
        for _ in range(plan[size]):
            counter += 1
            hu, lab = make_phantom(TRAIN_SEED * 1_000_003 + 500_000 + counter, (size, size))
            if size == 512:
                hu, lab = _crop(hu, lab, 256, rng)
            if rng.random() < 0.5:
                hu, lab = hu[:, ::-1], lab[:, ::-1]
            xs.append(window(np.ascontiguousarray(hu))[None])
            ys.append(np.ascontiguousarray(lab)[None].astype(np.float32))
        # BatchNorm stays frozen (eval mode): with batch statistics the model would learn to lean on
        # the statistics of 256-crops, which a whole 512x512 slice at inference does not have.
        model.eval()
        logits = model(torch.from_numpy(np.stack(xs)))
        yb = torch.from_numpy(np.stack(ys))
        loss = F.binary_cross_entropy_with_logits(logits, yb) + dice_loss(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 30 == 0:
            print(f"step {step + 1}/{steps} size {size} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    scores = {}
    for size in (128, 256, 512):
        v_hu, vy = make_phantoms(24, seed=HELDOUT_SEED, size=(size, size))
        scores[size] = heldout_dice(model, window(v_hu), vy, batch=4)
    print("held-out Dice " + ", ".join(f"{s}x{s} {d:.4f}" for s, d in scores.items()), flush=True)
    save_checkpoint(model, out, meta={
        "trained_on": f"stage 1 ({init.name}) + {steps} multi-scale steps at 128/256/512",
        "heldout_dice": ", ".join(f"{s}x{s} {d:.4f}" for s, d in scores.items()),
        "preprocessing": "CT window level 40 width 400 -> [0, 1]",
    })
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("attunet_demo.pt"))
    parser.add_argument("--samples", type=int, default=2400)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", type=Path, default=None, help="stage 2: continue from these weights")
    parser.add_argument("--multiscale", action="store_true", help="stage 2: train at 128, 256 and 512")
    parser.add_argument("--steps", type=int, default=420, help="stage 2 steps")
    args = parser.parse_args()
    if args.multiscale:
        if args.init is None:
            parser.error("--multiscale needs --init (the stage-1 weights)")
        multiscale(args.init, args.out, steps=args.steps)
        return
    train(args.out, samples=args.samples, epochs=args.epochs, batch=args.batch, lr=args.lr)


if __name__ == "__main__":
    main()
