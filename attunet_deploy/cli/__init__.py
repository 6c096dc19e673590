"""``attdeploy``: a thin click layer over the library, one module per command.

``app`` holds the group and the error-to-exit policy (:class:`~attunet_deploy.errors.ExitStatus`),
``options`` the option groups and validators commands share, ``render`` every table. Library
modules are imported inside commands so that ``attdeploy verify`` on a device without torch never
imports it, and ``--help`` stays fast.
"""

from __future__ import annotations

# Importing a command module registers it on the group.
from attunet_deploy.cli import (  # noqa: F401
    bench,
    build,
    demo_series,
    doctor,
    export,
    info,
    pipeline,
    predict,
    quantize,
    serve,
    triton,
    verify,
)
from attunet_deploy.cli.app import main

__all__ = ["main"]
