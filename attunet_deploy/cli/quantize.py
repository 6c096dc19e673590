"""``attdeploy quantize``.
"""

from __future__ import annotations

import click

from attunet_deploy.build.int8 import METHODS
from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import bundle_option, load_bundle, reporter
from attunet_deploy.cli.render import print_accuracy_aware, stdout


@main.command()
@bundle_option
@click.option("--calib", type=click.Path(exists=False), default=None, metavar="PATH",
              help="Calibration images: a directory or file (.npy/.npz, PNG/TIFF, DICOM, NIfTI); held-out golden "
                   "images are excluded by content. Default: the images export was given (--images; the held-out "
                   "quarter excluded); for the demo its phantoms. A user model exported without --images needs it.")
@click.option("--method", type=click.Choice(list(METHODS)), default="percentile",
              show_default=True, help="Activation calibration method.")
@click.option("--max-samples", type=int, default=64, show_default=True, help="Calibration images used at most.")
@click.option("--quantize-all", is_flag=True, help="Also quantise the attention gates' psi branch and the head.")
@click.option("--precision", "precisions", type=click.Choice(["fp16", "int8"]), multiple=True,
              help="Make only these (default both).")
@click.option("--full-range-weights", is_flag=True,
              help="8-bit instead of 7-bit INT8 weights: for GPU-only targets (x86 CPUs without VNNI then run "
                   "ONNX Runtime's slower exact int8 path).")
@click.option("--fp16-keep-fp32", "keep_fp32", multiple=True, metavar="NODE",
              help="Run this ONNX node in FP32 inside the FP16 graph (repeatable), e.g. where activations "
                   "overflow FP16.")
@click.option("--no-verify", is_flag=True, help="Write the graphs without checking them on ONNX Runtime first.")
@click.option("--max-dice-drop", type=float, default=None, metavar="X",
              help="Accuracy-aware INT8: while the held-out golden images' mean Dice vs FP32 is below 1 - X, return "
                   "the most sensitive convolutions to float, one at a time.")
@click.option("--allow-float", is_flag=True, help="With --max-dice-drop: keep the graph even when every convolution "
              "had to return to float (otherwise that is exit 1: it is not an INT8 graph).")
@click.option("--target", type=click.Choice(["all", "onnx", "openvino"]), default=None,
              help="INT8 graphs to write: onnx (the Q/DQ graph for TensorRT and ONNX Runtime), all (also NNCF's "
                   "OpenVINO graph when OpenVINO is installed; the default, or $ATTDEPLOY_INT8_TARGET), openvino "
                   "(as all, but an error when the OpenVINO graph cannot be made or misses its tolerance).")
def quantize(bundle_dir: str, calib: str | None, method: str, max_samples: int, quantize_all: bool,
             precisions: tuple[str, ...], full_range_weights: bool, keep_fp32: tuple[str, ...],
             no_verify: bool, max_dice_drop: float | None, allow_float: bool, target: str | None) -> None:
    """Write model.fp16.onnx and model.int8.onnx (Q/DQ), verified on ONNX Runtime CPU, in one commit."""
    from attunet_deploy.judge.report import verify_table
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    settings = QuantizeSettings(calib=calib, method=method, max_samples=max_samples, quantize_all=quantize_all,
                                precisions=tuple(precisions) or ("fp16", "int8"), verify=not no_verify,
                                full_range_weights=full_range_weights, fp16_keep_fp32=tuple(keep_fp32),
                                max_dice_drop=max_dice_drop, target=target, allow_float=allow_float)
    done = quantize_bundle(load_bundle(bundle_dir), settings, reporter=reporter())
    if done.rows:
        stdout().print(verify_table(done.rows, title="Quantised graphs on ONNX Runtime CPU vs PyTorch FP32"))
    print_accuracy_aware(done.bundle)
