"""``attdeploy export``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import export_options, reporter, require_torch, validated
from attunet_deploy.cli.render import print_bundle_summary, stdout


def _check_opset(opset: int) -> None:
    from attunet_deploy.steps.export import check_opset

    check_opset(opset)


def _roi(text: str) -> None:
    from attunet_deploy.steps.model_space import parse_triple

    parse_triple(text, "--roi")


def _spacing(text: str) -> None:
    from attunet_deploy.steps.model_space import parse_triple

    parse_triple(text, "--spacing", float)


@main.command()
@export_options
@click.option("--opset", default=18, show_default=True, type=int, callback=validated(_check_opset),
              help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--arch", type=click.Choice(["attunet2d", "oktay3d", "monai"]), default=None,
              help="Model family (default: read from the checkpoint's keys): the 2D AttU_Net, the paper's 3D networks, "
                   "MONAI's AttentionUnet.")
@click.option("--monai-args", default=None, metavar="K=V ...",
              help='MONAI AttentionUnet arguments the weights do not show, e.g. "strides=2,2,1".')
@click.option("--roi", default=None, metavar="DxHxW", callback=validated(_roi),
              help="3D models: the sliding window (default 96x96x96, rounded to the model's divisor).")
@click.option("--overlap", type=float, default=0.5, show_default=True, help="3D models: window overlap in [0, 1).")
@click.option("--sw-mode", type=click.Choice(["gaussian", "constant"]), default="gaussian", show_default=True,
              help="3D models: how overlapping windows are blended.")
@click.option("--spacing", default=None, metavar="ZxYxX", callback=validated(_spacing),
              help="3D models: voxel spacing in mm the model expects; volumes given with theirs are resampled to it.")
@click.option("--segment", "segments", multiple=True, metavar="CLASS=LABEL[@SCHEME:CODE:MEANING]",
              help="Name a class in DICOM SEGs (repeatable), e.g. '1=Pancreas@SCT:15776009:Pancreas'; recorded in "
                   "the manifest's postprocessing.segments.")
def export(model: str | None, out: str, images: str | None, labels: str | None, opset: int, trust_pickle: bool,
           force: bool, normalize: str | None, exporter: str, check_rel_l2: float, arch: str | None,
           monai_args: str | None, roi: str | None, overlap: float, sw_mode: str, spacing: str | None,
           segments: tuple[str, ...]) -> None:
    """Export MODEL (default: the bundled demo) to a bundle: weights, ONNX, golden set, manifest."""
    require_torch("export")  # before importing the export step, which needs torch
    from attunet_deploy.judge.report import verify_table
    from attunet_deploy.steps.export import export_bundle
    from attunet_deploy.steps.model_space import parse_triple

    bundle, row = export_bundle(model, out, opset=opset, trust_pickle=trust_pickle, force=force,
                                normalize=normalize, exporter=exporter, check_rel_l2=check_rel_l2,
                                images=images, labels=labels, reporter=reporter(), arch=arch, monai_args=monai_args,
                                roi=parse_triple(roi, "--roi") if roi else None, overlap=overlap, sw_mode=sw_mode,
                                spacing=parse_triple(spacing, "--spacing", float) if spacing else None,
                                segments=list(segments))
    print_bundle_summary(bundle)
    stdout().print(verify_table([row], title=f"ONNX Runtime CPU vs PyTorch FP32 (export check, rel L2 <= "
                                              f"{check_rel_l2:g})"))
