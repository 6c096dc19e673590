"""build/upconv.py: nearest x2 upsample + 3x3 conv rewritten as one transposed convolution, exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from attunet_deploy.build.upconv import rewrite_upsample_convs, transposed_kernel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class UpThenConv(nn.Module):
    def __init__(self, dims: int, mode: str = "nearest", stride: int = 1, padding: int = 1, share: bool = False):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.conv = conv(3, 5, kernel_size=3, stride=stride, padding=padding)
        self.share = share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(x)
        y = torch.relu(self.conv(u))
        return y + u.mean() if self.share else y  # share: the upsampled tensor has a second consumer


def exported(module: nn.Module, dims: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    sample = torch.zeros((1, 3, *(6,) * dims))
    axes = {0: "n", **{2 + i: f"s{i}" for i in range(dims)}}
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (sample,), buf, input_names=["x"], output_names=["y"], opset_version=18,
                      dynamic_axes={"x": axes}, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("dims,shape", [(2, (2, 3, 7, 10)), (2, (1, 3, 1, 1)), (3, (1, 3, 3, 5, 4))])
def test_rewrite_is_exact_at_any_size(dims: int, shape: tuple[int, ...]) -> None:
    model = exported(UpThenConv(dims), dims)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    before = run(model, x)
    assert len(rewrite_upsample_convs(model)) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" in ops and "Resize" not in ops and "Conv" not in ops
    after = run(model, x)
    assert after.shape == before.shape == (shape[0], 5, *(2 * s for s in shape[2:]))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))


@pytest.mark.parametrize("variant", [dict(mode="bilinear"), dict(stride=2), dict(padding=0), dict(share=True)])
def test_other_patterns_are_left_alone(variant: dict) -> None:
    model = exported(UpThenConv(2, **variant), 2)
    before = model.SerializeToString()
    assert rewrite_upsample_convs(model) == []
    assert model.SerializeToString() == before


def test_transposed_taps_sum_the_conv_taps_that_land_on_one_input_pixel() -> None:
    w = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)  # rows 0 1 2 / 3 4 5 / 6 7 8
    k = transposed_kernel(w)[0, 0]
    assert k.shape == (4, 4)
    assert k[0, 0] == w[0, 0, 2, 2] and k[3, 3] == w[0, 0, 0, 0]
    assert k[1, 1] == w[0, 0, 1:, 1:].sum() and k[2, 1] == w[0, 0, :2, 1:].sum()
    assert k.sum() == 4 * w.sum()  # each conv tap lands in one tap per output phase: 4 phases
