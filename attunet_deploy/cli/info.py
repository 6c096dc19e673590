"""``attdeploy info``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import bundle_option, check_json_path, load_bundle, write_json
from attunet_deploy.cli.render import print_bundle_state, print_bundle_summary


@main.command()
@bundle_option
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the manifest as JSON ('-': stdout).")
def info(bundle_dir: str, json_path: str | None) -> None:
    """What a bundle holds: model, artifacts, engines, TensorRT lint, verification state."""
    check_json_path(json_path, bundle_dir)
    bundle = load_bundle(bundle_dir)
    if json_path:
        write_json(json_path, bundle.manifest_copy())
        if json_path == "-":
            return
    print_bundle_summary(bundle)
    print_bundle_state(bundle)
