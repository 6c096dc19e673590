"""``attdeploy export``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import export_options, reporter, require_torch, validated
from attunet_deploy.cli.render import print_bundle_summary, stdout


def _check_opset(opset: int) -> None:
    from attunet_deploy.steps.export import check_opset

    check_opset(opset)


@main.command()
@export_options
@click.option("--opset", default=18, show_default=True, type=int, callback=validated(_check_opset),
              help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
def export(model: str | None, out: str, images: str | None, labels: str | None, opset: int, trust_pickle: bool,
           force: bool, normalize: str | None, exporter: str, check_rel_l2: float) -> None:
    """Export MODEL (default: the bundled demo) to a bundle: weights, ONNX, golden set, manifest."""
    from attunet_deploy.judge.report import verify_table
    from attunet_deploy.steps.export import export_bundle

    require_torch("export")
    bundle, row = export_bundle(model, out, opset=opset, trust_pickle=trust_pickle, force=force,
                                normalize=normalize, exporter=exporter, check_rel_l2=check_rel_l2,
                                images=images, labels=labels, reporter=reporter())
    print_bundle_summary(bundle)
    stdout().print(verify_table([row], title=f"ONNX Runtime CPU vs PyTorch FP32 (export check, rel L2 <= "
                                              f"{check_rel_l2:g})"))
