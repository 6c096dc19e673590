"""The popular AttU_Net's state_dict layout and forward pass, written independently of
attunet_deploy.models.attunet2d from the published structure, so tests can check our import against it.

Structure (per the published code): conv_block = Sequential(Conv3x3, BN, ReLU, Conv3x3, BN, ReLU)
as ``.conv``; up_conv = Sequential(Upsample x2 nearest, Conv3x3, BN, ReLU) as ``.up``;
Attention_block with ``W_g`` = (Conv1x1, BN), ``W_x`` = (Conv1x1, BN), ``psi`` = (Conv1x1 -> 1, BN,
Sigmoid); modules Conv1..Conv5, Up5..Up2, Att5..Att2, Up_conv5..Up_conv2 and a 1x1 head named
``Conv_1x1`` (LeeJunHyun) or ``Conv`` (bigmb).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(sd, name, cin, cout, k, g):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.05


def _bn(sd, name, c, g):
    sd[f"{name}.weight"] = 1.0 + 0.2 * torch.randn(c, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=g)
    sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
    sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def popular_state_dict(img_ch=3, output_ch=1, base=64, head="Conv_1x1", seed=0):
    """Random weights and non-trivial BatchNorm statistics in the popular key layout."""
    g = torch.Generator().manual_seed(seed)
    f = [base, base * 2, base * 4, base * 8, base * 16]
    sd = {}

    def conv_block(name, cin, cout):
        _conv(sd, f"{name}.conv.0", cin, cout, 3, g)
        _bn(sd, f"{name}.conv.1", cout, g)
        _conv(sd, f"{name}.conv.3", cout, cout, 3, g)
        _bn(sd, f"{name}.conv.4", cout, g)

    conv_block("Conv1", img_ch, f[0])
    for i in range(1, 5):
        conv_block(f"Conv{i + 1}", f[i - 1], f[i])
    ints = {5: f[2], 4: f[1], 3: f[0], 2: 32}
    for lvl in (5, 4, 3, 2):
        cin, cout = f[lvl - 1], f[lvl - 2]
        _conv(sd, f"Up{lvl}.up.1", cin, cout, 3, g)
        _bn(sd, f"Up{lvl}.up.2", cout, g)
        _conv(sd, f"Att{lvl}.W_g.0", cout, ints[lvl], 1, g)
        _bn(sd, f"Att{lvl}.W_g.1", ints[lvl], g)
        _conv(sd, f"Att{lvl}.W_x.0", cout, ints[lvl], 1, g)
        _bn(sd, f"Att{lvl}.W_x.1", ints[lvl], g)
        _conv(sd, f"Att{lvl}.psi.0", ints[lvl], 1, 1, g)
        _bn(sd, f"Att{lvl}.psi.1", 1, g)
        conv_block(f"Up_conv{lvl}", 2 * cout, cout)
    _conv(sd, head, f[0], output_ch, 1, g)
    return sd


def popular_forward(sd, x, head="Conv_1x1"):
    """The popular AttU_Net's eval-mode forward, computed functionally from its state_dict."""

    def conv(name, t, pad):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad)

    def bn(name, t):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    def block(name, t):
        t = F.relu(bn(f"{name}.conv.1", conv(f"{name}.conv.0", t, 1)))
        return F.relu(bn(f"{name}.conv.4", conv(f"{name}.conv.3", t, 1)))

    def up(name, t):
        t = F.interpolate(t, scale_factor=2, mode="nearest")
        return F.relu(bn(f"{name}.up.2", conv(f"{name}.up.1", t, 1)))

    def att(name, g_, x_):
        a = bn(f"{name}.W_g.1", conv(f"{name}.W_g.0", g_, 0))
        b = bn(f"{name}.W_x.1", conv(f"{name}.W_x.0", x_, 0))
        psi = torch.sigmoid(bn(f"{name}.psi.1", conv(f"{name}.psi.0", F.relu(a + b), 0)))
        return x_ * psi

    x1 = block("Conv1", x)
    x2 = block("Conv2", F.max_pool2d(x1, 2))
    x3 = block("Conv3", F.max_pool2d(x2, 2))
    x4 = block("Conv4", F.max_pool2d(x3, 2))
    x5 = block("Conv5", F.max_pool2d(x4, 2))
    d = x5
    for lvl, skip in ((5, x4), (4, x3), (3, x2), (2, x1)):
        d = up(f"Up{lvl}", d)
        d = block(f"Up_conv{lvl}", torch.cat((att(f"Att{lvl}", d, skip), d), dim=1))
    return conv(head, d, 0)


def wrap_checkpoint(sd, style):
    """The shapes checkpoints come in from training scripts."""
    if style == "bare":
        return sd
    if style == "dataparallel":
        return {"epoch": 42, "best_dice": 0.91, "state_dict": {"module." + k: v for k, v in sd.items()}}
    if style == "model":
        return {"model": sd, "optimizer": {"lr": 0.001}}
    raise ValueError(style)


def to_popular_layout(state_dict, head="Conv_1x1"):
    """This project's state_dict keys (enc1., att5., head. ...) renamed to the popular AttU_Net's."""
    import re

    renames = ((r"^enc([1-5])\.", r"Conv\1."), (r"^dec([2-5])\.", r"Up_conv\1."), (r"^up([2-5])\.", r"Up\1."),
               (r"^att([2-5])\.", r"Att\1."), (r"^head\.", f"{head}."))
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out
