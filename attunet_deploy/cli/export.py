"""``attdeploy export``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import export_options, export_settings, reporter, require_torch
from attunet_deploy.cli.render import print_bundle_summary, stdout


@main.command()
@export_options
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--arch", type=click.Choice(["attunet2d", "oktay3d", "monai"]), default=None,
              help="Model family (default: read from the checkpoint's keys): the 2D AttU_Net, the paper's 3D networks, "
                   "MONAI's AttentionUnet.")
@click.option("--monai-args", default=None, metavar="K=V ...",
              help='MONAI AttentionUnet arguments the weights do not show, e.g. "strides=2,2,1".')
@click.option("--roi", default=None, metavar="DxHxW",
              help="3D models: the sliding window (default 96x96x96, rounded to the model's divisor).")
@click.option("--overlap", type=float, default=0.5, show_default=True, help="3D models: window overlap in [0, 1).")
@click.option("--sw-mode", type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True,
              help="3D models: how overlapping windows are blended.")
@click.option("--spacing", default=None, metavar="ZxYxX",
              help="3D models: voxel spacing in mm the model expects; volumes given with theirs are resampled to it.")
@click.option("--segment", "segments", multiple=True, metavar="CLASS=LABEL[@SCHEME:CODE:MEANING][#RRGGBB]",
              help="Name (and colour) a class in DICOM outputs (repeatable), e.g. "
                   "'1=Pancreas@SCT:15776009:Pancreas#E6A000'; recorded in the manifest's postprocessing.segments.")
@click.option("--keep-largest", default=None, is_flag=False, flag_value="all", metavar="[CLASSES]",
              help="Keep only the largest connected component of each class (or of CLASSES, e.g. 1,3): part of "
                   "the model, applied on every backend and judged by verify.")
@click.option("--min-component-ml", type=float, default=None, metavar="ML",
              help="3D models with --spacing: remove connected components smaller than ML millilitres.")
def export(model: str | None, out: str, images: str | None, labels: str | None, opset: int, trust_pickle: bool,
           force: bool, normalize: str | None, exporter: str, check_rel_l2: float, arch: str | None,
           monai_args: str | None, roi: str | None, overlap: float, sw_mode: str, spacing: str | None,
           segments: tuple[str, ...], keep_largest: str | None, min_component_ml: float | None) -> None:
    """Export MODEL (default: the bundled demo) to a bundle: weights, ONNX, golden set, manifest."""
    settings = export_settings(model, out, images=images, labels=labels, opset=opset, trust_pickle=trust_pickle,
                               force=force, normalize=normalize, exporter=exporter, check_rel_l2=check_rel_l2,
                               arch=arch, monai_args=monai_args, roi=roi, overlap=overlap, sw_mode=sw_mode,
                               spacing=spacing, segments=segments, keep_largest=keep_largest,
                               min_component_ml=min_component_ml)
    require_torch("export")  # before importing the export step, which needs torch
    from attunet_deploy.judge.report import verify_table
    from attunet_deploy.steps.export import export_bundle

    bundle, row = export_bundle(settings, reporter=reporter())
    print_bundle_summary(bundle)
    stdout().print(verify_table([row], title=f"ONNX Runtime CPU vs PyTorch FP32 (export check, rel L2 <= "
                                              f"{check_rel_l2:g})"))
