"""Markdown written from untrusted text (file and folder names, reasons): report.md, the diff index.

Markdown viewers render inline HTML and links; a file named ``"><img src=x onerror=...>`` must stay
text. HTML's special characters become entities, Markdown's inline ones get backslash escapes
(CommonMark 2.4); ``.``, ``-``, ``#`` and ``+`` only matter at the start of a line, which this text
never is.
"""

from __future__ import annotations

#: HTML's special characters as entities; Markdown's as backslash escapes (CommonMark 2.4).
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MARKDOWN = set("\\`*_{}[]()|~")  # inline only: our text never starts a line


def md_escape(text: object) -> str:
    """``text`` (a file name, a folder, a reason) as literal text in Markdown that viewers may render
    with inline HTML: no tag, link, code span or table cell border can come out of it."""
    out = []
    for ch in " ".join(str(text).split()):
        out.append(_HTML.get(ch) or ("\\" + ch if ch in _MARKDOWN else ch))
    return "".join(out)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
