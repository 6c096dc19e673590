"""Progress reporting for long steps. Library code takes a Reporter; the CLI passes a rich one.

The default :class:`Reporter` is silent, so the Python API prints nothing unless asked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Reporter:
    """Silent reporter: the interface library code calls."""

    def info(self, message: str) -> None:
        """A one-line notice (e.g. 'INT8 skipped: no --calib'); may hold rich markup."""

    def notice(self, label: str, text: str) -> None:
        """A highlighted label followed by literal text."""
        self.info(f"{label} {text}")

    def table(self, renderable: Any) -> None:
        """A rich table (or other renderable) worth showing on the terminal."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """A slow step with no measurable progress (spinner + elapsed time)."""
        yield

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A step with ``total`` units; the yielded callable advances it by n (default 1)."""
        yield lambda n=1: None


class RichReporter(Reporter):
    """Spinners, progress bars and notices on stderr (stdout stays clean for JSON)."""

    def __init__(self, quiet: bool = False) -> None:
        import sys

        from rich.console import Console

        # Logs and CI get wide tables rather than rich's 80-column default.
        self.console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def table(self, renderable: Any) -> None:
        if not self.quiet:
            self.console.print(renderable)

    def notice(self, label: str, text: str) -> None:
        """A yellow label followed by literal text (no rich markup inside ``text``)."""
        from rich.markup import escape

        self.info(f"[yellow]{label}[/yellow] {escape(text)}")

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        t0 = time.perf_counter()
        # length unknown: a spinner, with the time so far (a step that takes a minute says so as it goes)
        with Progress(SpinnerColumn(), TextColumn("{task.description} ..."), TimeElapsedColumn(),
                      console=self.console, transient=True) as bar:
            bar.add_task(description, total=None)
            yield
        self.console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - t0:.1f}s)[/dim]",
                           highlight=False)

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        if self.quiet:
            yield lambda n=1: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        t0 = time.perf_counter()
        # elapsed and remaining (the ETA from the units done so far)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        self.console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - t0:.1f}s)[/dim]",
                           highlight=False)
