"""``attdeploy predict SERIES_DIR --dicom-seg -o OUT``: one DICOM SEG per CT series found."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attunet_deploy.apps.dicom.seg import SegNaming, build_seg, write_seg
from attunet_deploy.apps.dicom.series import segment_series
from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.io.dicom import load_volume
from attunet_deploy.io.dicom_series import dedupe_series, order_slices, scan
from attunet_deploy.loader import load_runner


def model_sha256(bundle: Bundle, precision: str) -> str:
    from attunet_deploy.bundle import ONNX_FILES

    return bundle.sha256(ONNX_FILES.get(precision, "model.onnx")) or bundle.sha256("model.onnx") or "unknown"


def seg_name(series_uid: str) -> str:
    """The SEG's file name: the series UID where it is a valid UID, else a digest of it (never a
    path, never shared by two series)."""
    import hashlib

    from attunet_deploy.apps.dicom.checks import is_valid_uid

    if is_valid_uid(series_uid):
        return f"SEG_{series_uid}.dcm"
    return f"SEG_{re.sub(r'[^0-9A-Za-z.]', '_', series_uid)[:40].strip('.')}_" \
           f"{hashlib.sha256(series_uid.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.dcm"


@dataclass(frozen=True)
class SegRow:
    """One series' result: the SEG written for it."""

    series: str
    slices: int
    frames: int
    seg: str
    backend: str


def predict_series_folder(bundle: Bundle, inputs: list[str], out: str | os.PathLike[str], *, backend: str = "auto",
                          precision: str = "fp32", overwrite: bool = False, segment_label: str = "Target",
                          reporter: Reporter | None = None, **runner_options: Any) -> list[SegRow]:
    """Segment every CT series under ``inputs``; returns a row per SEG written.

    Files that are not CT images, or hold no pixel data, are skipped with a one-line notice.
    Every series is ordered and every output name checked before anything is written. A 3D bundle
    segments each series as one volume at its own spacing (``series.segment_series``).
    """
    reporter = reporter or Reporter()
    series, skipped = scan(inputs)
    for path, reason in skipped:
        reporter.notice("skipped:", f"{path}: {reason}")
    if not series:
        raise InputError(f"no CT series with pixel data under {', '.join(inputs)}")
    ordered = {}
    for uid, insts in series.items():
        kept, notices = dedupe_series(insts)
        for text in notices:
            reporter.notice("duplicate:", text)
        ordered[uid] = order_slices(kept)
    if bundle.spatial_dims == 3:  # a volume needs a regular grid: refuse before any SEG is written
        from attunet_deploy.io.dicom_series import series_spacing

        for insts in ordered.values():
            series_spacing(insts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a directory")
    targets = {uid: out / seg_name(uid) for uid in ordered}
    if not overwrite:
        for path in targets.values():
            if path.exists():
                raise InputError(f"{path} exists: choose another -o, or pass --overwrite to replace it")
    runner = load_runner(bundle, backend=backend, precision=precision, **runner_options)
    sha = model_sha256(bundle, precision)
    rows = []
    with runner, reporter.progress(f"Segmenting {len(ordered)} series on {runner.name}", len(ordered)) as advance:
        for uid, insts in ordered.items():
            datasets, hu = load_volume(insts)
            masks = segment_series(runner, insts, hu)
            seg = build_seg(datasets, masks, SegNaming.of(bundle, segment_label), model_sha256=sha)
            write_seg(seg, targets[uid])
            rows.append(SegRow(uid, len(insts), int(seg.NumberOfFrames), str(targets[uid]), runner.name))
            advance()
    return rows
