"""``verify --save-diff``: where a backend's mask differs from the reference's, as PNG pictures.

One PNG per listed worst image of each backend/precision, drawn by the panel renderer that
``report.html`` uses (:mod:`attunet_deploy.judge.panels`): input, reference outline, backend
outline and difference map side by side, upscaled to at least 384 pixels a tile. A volume (3D
bundles) is shown by its worst axial slice: the one where the masks differ most; its file name
carries the slice (``-z12``). ``report.md`` in the folder has the legend and a table of every picture.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from attunet_deploy.fileio import write_bytes_atomic, write_text_atomic
from attunet_deploy.judge.markdown import md_escape
from attunet_deploy.judge.panels import LEGEND, Panel, encode_png, render_panel
from attunet_deploy.judge.results import VerifyRow


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "image"


def _file_label(panel: Panel) -> str:
    return _safe(panel.name) + ("" if panel.axial_slice is None else f"-z{panel.axial_slice}")


def write_diff_images(folder: Path, row: VerifyRow, panels: Sequence[Panel]) -> list[str]:
    """A PNG per panel of ``row`` (its worst images, lowest Dice first); returns their paths
    relative to ``folder``."""
    sub = folder / f"{row.backend}-{row.precision}"
    written = []
    for rank, panel in enumerate(panels, 1):
        path = sub / f"{rank}-{_file_label(panel)}.png"
        write_bytes_atomic(path, encode_png(render_panel(panel)))
        written.append(path.relative_to(folder).as_posix())
    return sorted(written)


def write_diff_index(folder: Path, rows: Sequence[VerifyRow], reference: str) -> None:
    lines = [f"# Mask differences against {reference}", "", f"Legend: {LEGEND}.", "",
             "| backend | precision | image | Dice vs reference | picture |", "|---|---|---|---|---|"]
    for r in rows:
        pics = dict(zip([w.file for w in r.worst_images], r.diff_images or ()))
        for w in r.worst_images:
            pic = pics.get(w.file, "")
            lines.append(f"| {r.backend} | {r.precision} | {md_escape(w.file)} | {w.dice:.4f} | "
                         + (f"![]({pic})" if pic else "-") + " |")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.md", "\n".join(lines) + "\n")
