"""Runners: things that RUN bundle artifacts. Importable without torch."""

from __future__ import annotations

from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import BACKEND_MODULES, BACKENDS, available_backends, register, runner_class
from attunet_deploy.runtimes.select import AUTO_ORDER, open_runner, resolve_auto

__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_MODULES", "Runner", "available_backends", "open_runner", "register",
           "resolve_auto", "runner_class"]
