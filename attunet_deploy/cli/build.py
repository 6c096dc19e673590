"""``attdeploy build``.
"""

from __future__ import annotations

import click

from attunet_deploy.build.tensorrt import check_workspace_mb
from attunet_deploy.bundle import PRECISIONS
from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import bundle_option, load_bundle, reporter, validated
from attunet_deploy.cli.render import print_engines


@main.command()
@bundle_option
@click.option("--precision", "precisions", type=click.Choice(PRECISIONS), multiple=True,
              required=True, help="Engine precision (repeatable).")
@click.option("--min-shape", "min_shapes", multiple=True, metavar="NxCx[D]xHxW",
              help="Profile minimum (repeatable; NxCxDxHxW for 3D bundles).")
@click.option("--opt-shape", "opt_shapes", multiple=True, metavar="NxCx[D]xHxW",
              help="Profile optimum (repeatable; 3D default: the sliding window's roi).")
@click.option("--max-shape", "max_shapes", multiple=True, metavar="NxCx[D]xHxW", help="Profile maximum (repeatable).")
@click.option("--workspace-mb", type=int, default=None, callback=validated(check_workspace_mb),
              help="Builder workspace cap (default: a safe share of free device memory).")
@click.option("--force", is_flag=True, help="Rebuild even if a matching engine is cached.")
def build(bundle_dir: str, precisions: tuple[str, ...], min_shapes: tuple[str, ...], opt_shapes: tuple[str, ...],
          max_shapes: tuple[str, ...], workspace_mb: int | None, force: bool) -> None:
    """Build TensorRT engines on this device from the bundle's ONNX graphs."""
    from attunet_deploy.build.tensorrt import parse_profiles
    from attunet_deploy.steps.engines import build_engines, bundle_profile

    bundle = load_bundle(bundle_dir)
    profiles = parse_profiles(min_shapes, opt_shapes, max_shapes, channels=bundle.in_channels,
                              divisor=bundle.divisors, spatial_dims=bundle.spatial_dims, default=bundle_profile(bundle))
    built = build_engines(bundle, list(precisions), profiles, workspace_mb=workspace_mb, force=force,
                            reporter=reporter())
    print_engines(built.engines)
