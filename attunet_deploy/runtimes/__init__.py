"""Runners: things that RUN bundle artifacts. Importable without torch."""

from __future__ import annotations

from .base import AUTO_ORDER, BACKEND_MODULES, Runner, available_backends, load_runner, register, runner_class

__all__ = ["AUTO_ORDER", "BACKEND_MODULES", "Runner", "available_backends", "load_runner", "register",
           "runner_class"]
