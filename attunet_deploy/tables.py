"""Terminal tables that never split a number: numeric columns do not wrap, text columns fold, and a
table too wide for the terminal is shown as one block per row ("header: value" lines) instead of
squeezed. Every rich table the CLI prints goes through :func:`fit`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

#: A cell that is a number: 0.9987, 1.42e-05, 12,345, 99.99 %, 3.1x, 128x128, 12 ms, -, n/a.
NUMBER = re.compile(r"^[-+]?(\d[\d,]*(\.\d+)?([eE][-+]?\d+)?|\.\d+)(\s*(%|x|×|ms|s|MB|GB))?$"
                    r"|^\d+(x\d+)+$|^-$")


def _plain(cell: Any) -> str:
    return str(getattr(cell, "plain", cell)).strip()


class Fitted:
    """A rich Table that renders as itself where it fits, else as one block per row."""

    def __init__(self, table: Any) -> None:
        self.table = table
        for column in table.columns:
            cells = [_plain(c) for c in column.cells]
            if cells and all(NUMBER.match(c) for c in cells if c):
                column.no_wrap = True  # a number is never broken over two lines
            elif column.overflow not in ("fold",):
                column.overflow = "fold"  # long text (paths, notes) folds instead of being cut

    def need(self) -> int:
        """Columns the table needs with every number whole and every word of text unbroken (rich's own
        minimum would crop no-wrap columns instead of refusing)."""
        total = 1
        for column in self.table.columns:
            cells = [_plain(c) for c in column.cells]
            words = [w for c in [_plain(column.header), *cells] for w in c.split()]
            widest = max((len(w) for w in words), default=1)
            if column.no_wrap:
                widest = max([widest, *(len(c) for c in cells)])
            total += widest + 3  # padding and the border
        return total

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        from rich.text import Text

        if self.need() <= options.max_width:
            yield self.table
            return
        t = self.table
        if t.title:
            yield Text.from_markup(str(t.title), style="italic") if isinstance(t.title, str) else t.title
        headers = [_plain(c.header) for c in t.columns]
        rows = list(zip(*[list(c.cells) for c in t.columns]))
        for row in rows:
            yield Text("─" * min(options.max_width, 40), style="dim")
            for header, cell in zip(headers, row):
                line = Text(f"{header}: ", style="bold")
                line.append_text(cell if isinstance(cell, Text) else Text.from_markup(str(cell)))
                yield line
        if t.caption:
            yield Text.from_markup(str(t.caption), style="dim") if isinstance(t.caption, str) else t.caption


def fit(table: Any) -> Fitted:
    """``table`` ready for any terminal width (see the module)."""
    return Fitted(table)
