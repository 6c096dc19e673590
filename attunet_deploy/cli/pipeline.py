"""``attdeploy pipeline``."""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import export_options, export_settings, reporter, require_torch, shape_option, validated
from attunet_deploy.cli.render import stdout


def _check_iterations(n: int) -> None:
    from attunet_deploy.judge.bench import BenchSettings

    BenchSettings.check_options(iterations=n)


def _refuse_another_model(out: str, model: str | None) -> None:
    """A pipeline re-run into its own bundle is fine (idempotent); into a folder holding another
    model's bundle it would replace it without a word: exit 2, naming --force and -o."""
    from pathlib import Path

    from attunet_deploy.bundle import Bundle
    from attunet_deploy.bundle.schema import MANIFEST
    from attunet_deploy.demo import DEMO3D_WEIGHTS, DEMO_WEIGHTS
    from attunet_deploy.errors import AttDeployError, InputError

    if not (Path(out) / MANIFEST).is_file():
        return
    try:
        held = Bundle.load(out)
    except AttDeployError:
        return  # not a readable bundle of ours: export's own target checks decide
    new = Path(model).name if model is not None else DEMO_WEIGHTS.name
    old = Path(held.source.path).name
    if old and new != old:
        kind = {DEMO_WEIGHTS.name: "the 2D demo", DEMO3D_WEIGHTS.name: "the 3D demo"}
        raise InputError(f"-o {out} holds the bundle of {kind.get(old, old)}, not {kind.get(new, new)}: choose "
                         "another -o, or pass --force to replace it")


@main.command()
@export_options
@click.option("--calib", default=None, metavar="PATH",
              help="Your images: calibration set for INT8 (required for a user model's INT8) and, unless --images "
                   "is given, also the images a held-out quarter of is judged on.")
@click.option("--bench-iterations", type=int, default=20, show_default=True, callback=validated(_check_iterations),
              help="Timed iterations per backend.")
@shape_option
@click.option("--demo", type=click.Choice(["2d", "3d"]), default=None,
              help="Run on a bundled demo model instead of MODEL: 2d (the default without MODEL), or 3d (the paper's "
                   "3D network on synthetic CT volumes, through the sliding window).")
def pipeline(model: str | None, out: str, calib: str | None, images: str | None, labels: str | None,
             trust_pickle: bool, force: bool, normalize: str | None, bench_iterations: int, shape: str | None,
             check_rel_l2: float, demo: str | None) -> None:
    """export -> quantize -> build (if GPU) -> verify all -> bench all -> report."""
    from attunet_deploy.apps.pipeline import run_pipeline
    from attunet_deploy.errors import InputError

    if demo is not None and model is not None:
        raise InputError("give MODEL or --demo, not both")
    if demo == "3d":
        from attunet_deploy.demo import DEMO3D_WEIGHTS

        model = str(DEMO3D_WEIGHTS)
        if click.get_current_context().get_parameter_source("out") == click.core.ParameterSource.DEFAULT:
            out = "deploy3d"  # the 2D demo's ./deploy stays as it is
    if not force:
        _refuse_another_model(out, model)
    settings = export_settings(model, out, images=images if images is not None else calib, labels=labels,
                               trust_pickle=trust_pickle, force=force,
                               normalize=normalize, check_rel_l2=check_rel_l2)
    require_torch("pipeline")
    rc = run_pipeline(settings, calib=calib, bench_iterations=bench_iterations, shape=shape, reporter=reporter(),
                      console=stdout())
    if rc:
        from attunet_deploy.errors import VerificationFailed

        raise VerificationFailed("verification failed for at least one backend (see the report)")
