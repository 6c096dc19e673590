"""``attdeploy doctor``.
"""

from __future__ import annotations

import click

from attunet_deploy.cli.app import main
from attunet_deploy.cli.options import write_json
from attunet_deploy.cli.render import print_doctor


@main.command()
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the report as JSON ('-': stdout).")
def doctor(json_path: str | None) -> None:
    """Versions and availability of python, numpy, torch, onnx, onnxruntime, TensorRT, CUDA, GPU."""
    from attunet_deploy.environment import doctor_report

    probes = doctor_report()
    if json_path:
        write_json(json_path, [p.as_dict() for p in probes])
        if json_path == "-":
            return
    print_doctor(probes)
