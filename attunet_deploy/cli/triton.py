"""``attdeploy triton``.
"""

from __future__ import annotations

import click

from attunet_deploy.bundle import PRECISIONS
from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import bundle_option, load_bundle, reporter, require_extra
from attunet_deploy.cli.render import print_triton_repository


@main.command()
@bundle_option
@click.option("-o", "--output", "out", required=True, metavar="REPO", help="Model repository folder to write.")
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              help="Graphs to serve (repeatable; default every graph the bundle has).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="max_batch_size of the served models.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Where the ONNX models run; with cpu the ensemble uses attunet_cpu.")
@click.option("--tensorrt-accelerator", is_flag=True,
              help="Let ONNX Runtime in Triton build TensorRT engines (strongly typed, precision from the graph).")
def triton(bundle_dir: str, out: str, precisions: tuple[str, ...], max_batch: int, instances: int, kind: str,
           tensorrt_accelerator: bool) -> None:
    """Write a Triton Inference Server model repository: ONNX models, TensorRT plans built here,
    pre/post-processing and an ensemble raw image -> mask. Every config is checked with Triton's schema."""
    require_extra("triton", ("tritonclient", "google.protobuf"), "triton")
    from attunet_deploy.bundle import ONNX_FILES
    from attunet_deploy.steps.triton_repo import write_repository

    bundle = load_bundle(bundle_dir)
    chosen = list(precisions) or [p for p, f in ONNX_FILES.items() if f in bundle.artifacts]
    models = write_repository(bundle, out, chosen, max_batch=max_batch, instances=instances, kind=kind,
                              tensorrt_accelerator=tensorrt_accelerator, reporter=reporter())
    print_triton_repository(models, out)
