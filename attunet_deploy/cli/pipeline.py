"""``attdeploy pipeline``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import export_options, reporter, require_torch, shape_option, validated
from attunet_deploy.cli.render import stdout


def _check_iterations(n: int) -> None:
    from attunet_deploy.judge.bench import BenchSettings

    BenchSettings.check_options(iterations=n)


@main.command()
@export_options
@click.option("--calib", default=None, metavar="PATH",
              help="Your images: calibration set for INT8 (required for a user model's INT8) and, unless --images "
                   "is given, also the images a held-out quarter of is judged on.")
@click.option("--bench-iterations", type=int, default=20, show_default=True, callback=validated(_check_iterations),
              help="Timed iterations per backend.")
@shape_option
def pipeline(model: str | None, out: str, calib: str | None, images: str | None, labels: str | None,
             trust_pickle: bool, force: bool, normalize: str | None, bench_iterations: int, shape: str | None,
             check_rel_l2: float) -> None:
    """export -> quantize -> build (if GPU) -> verify all -> bench all -> report."""
    from attunet_deploy.apps.pipeline import run_pipeline

    require_torch("pipeline")
    rc = run_pipeline(model, out, calib=calib, images=images, labels=labels, trust_pickle=trust_pickle, force=force,
                      normalize=normalize, bench_iterations=bench_iterations, shape=shape,
                      check_rel_l2=check_rel_l2, reporter=reporter(), console=stdout())
    if rc:
        from attunet_deploy.errors import VerificationFailed

        raise VerificationFailed("verification failed for at least one backend (see the report)")
