"""``attdeploy predict SERIES_DIR --dicom-seg -o OUT``: DICOM results (SEG, and as asked RTSTRUCT, a
Secondary Capture overlay, an SR) per CT series found, each series passed by the acceptance gate
first and flagged by QA after."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.apps.dicom.assess import assess_series, features, forced_reason, judge_series
from attunet_deploy.apps.dicom.gate import Gate
from attunet_deploy.apps.dicom.outputs import SeriesResult, parse_outputs, voxel_mm3, write_outputs
from attunet_deploy.apps.dicom.seg import Provenance, SegNaming
from attunet_deploy.apps.dicom.series import segment_series
from attunet_deploy.bundle import Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.dicomtext import check_dicom_text
from attunet_deploy.errors import InputError
from attunet_deploy.io.dicom import Instance, dicom_header, load_volume
from attunet_deploy.io.dicom_series import dedupe_series, order_slices, scan
from attunet_deploy.loader import load_runner
from attunet_deploy.qa import MaskTally, QaResult, slice_percentiles

#: File-name prefix of each output kind (the SC overlay is a folder of images).
PREFIX = {"seg": "SEG", "rtstruct": "RTSTRUCT", "sc": "SC", "sr": "SR"}


def model_sha256(bundle: Bundle, precision: str) -> str:
    from attunet_deploy.bundle import ONNX_FILES

    return bundle.sha256(ONNX_FILES.get(precision, "model.onnx")) or bundle.sha256("model.onnx") or "unknown"


def provenance(bundle: Bundle, precision: str) -> Provenance:
    manifest = bundle.root / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""
    return Provenance(model_sha256(bundle, precision), digest, bundle.architecture)


def stem(series_uid: str) -> str:
    """A series' file-name stem: its UID where it is a valid UID, else a digest of it (never a path,
    never shared by two series)."""
    from attunet_deploy.apps.dicom.checks import is_valid_uid

    if is_valid_uid(series_uid):
        return series_uid
    return f"{re.sub(r'[^0-9A-Za-z.]', '_', series_uid)[:40].strip('.')}_" \
           f"{hashlib.sha256(series_uid.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def seg_name(series_uid: str) -> str:
    return f"SEG_{stem(series_uid)}.dcm"


def output_path(out: Path, series_uid: str, kind: str, k: int = 0) -> Path:
    if kind == "sc":
        return out / f"SC_{stem(series_uid)}" / f"{k + 1:04d}.dcm"
    return out / f"{PREFIX[kind]}_{stem(series_uid)}.dcm"


@dataclass(frozen=True)
class SeriesOptions:
    """What is answered for each series and which series are taken: ``outputs`` (seg, rtstruct, sc,
    sr), the acceptance ``accept`` rules file (None: built-in defaults), ``force`` (segment a refused
    series anyway, flagged for review), and the segment label."""

    outputs: tuple[str, ...] = ("seg",)
    accept: str | None = None
    force: bool = False
    segment_label: str | None = None  # None: the bundle's name, else "Target"

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", parse_outputs(",".join(self.outputs)))
        if self.segment_label is not None:
            object.__setattr__(self, "segment_label", check_dicom_text(self.segment_label, "segment label",
                                                                       field="segment_label"))


@dataclass(frozen=True)
class SegRow:
    """One series' result: what was written for it, and its QA flag."""

    series: str
    slices: int
    frames: int
    seg: str
    backend: str
    qa: QaResult = field(default_factory=QaResult)
    outputs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"series": self.series, "slices": self.slices, "seg": self.seg, "backend": self.backend,
                "qa": self.qa.to_dict(), "outputs": list(self.outputs)}


def _plan(bundle: Bundle, inputs: list[str], options: SeriesOptions, reporter: Reporter
          ) -> dict[str, tuple[list[Instance], tuple[str, ...]]]:
    """Series UID -> (its instances in order, the gate refusal --force overrode); InputError naming every
    series the gate refuses (without --force) before any work."""
    series, skipped = scan(inputs)
    for path, reason in skipped:
        reporter.notice("skipped:", f"{path}: {reason}")
    if not series:
        raise InputError(f"no CT series with pixel data under {', '.join(inputs)}")
    gate = Gate.for_bundle(bundle, options.accept)
    plan: dict[str, tuple[list[Instance], tuple[str, ...]]] = {}
    refused: list[str] = []
    for uid, insts in series.items():
        kept, notices = dedupe_series(insts)
        for text in notices:
            reporter.notice("duplicate:", text)
        ordered = order_slices(kept)
        verdict = judge_series(gate, bundle, ordered, dicom_header(ordered[0].path))
        if not verdict.accepted and not options.force:
            refused.append(f"series {uid} refused by {verdict.rule}: {verdict.reason[:160]}")
        elif not verdict.accepted:
            reporter.notice("warning:", f"series {uid}: {forced_reason(verdict)}; flagged for review")
        plan[uid] = (ordered, () if verdict.accepted else (forced_reason(verdict),))
    if refused:
        # every refused series named (a study's worth fits one line), none cut off
        more = f"; and {len(refused) - 12} more" if len(refused) > 12 else ""
        raise InputError("; ".join(refused[:12]) + more + " (--force segments them anyway, flagged for review; "
                         "--accept RULES.json chooses series by your own rules)", field="accept")
    return plan


def predict_series_folder(bundle: Bundle, inputs: list[str], out: str | os.PathLike[str], *, backend: str = "auto",
                          precision: str = "fp32", overwrite: bool = False, options: SeriesOptions | None = None,
                          reporter: Reporter | None = None, **runner_options: Any) -> list[SegRow]:
    """Write the results of every CT series under ``inputs``; returns a row per series.

    Files that are not CT images, or hold no pixel data, are skipped with a one-line notice. Every
    series is ordered, judged by the gate and every output name checked before anything is written. A
    3D bundle segments each series as one volume at its own spacing (``series.segment_series``).
    """
    reporter = reporter or Reporter()
    options = options or SeriesOptions()
    plan = _plan(bundle, inputs, options, reporter)
    if bundle.spatial_dims == 3:  # a volume needs a regular grid: refuse before any file is written
        from attunet_deploy.io.dicom_series import series_spacing

        for insts, _ in plan.values():
            series_spacing(insts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a directory")
    if not overwrite:
        for uid in plan:
            for kind in options.outputs:
                path = output_path(out, uid, kind)
                if path.exists() or (kind == "sc" and path.parent.exists()):
                    raise InputError(f"{path if kind != 'sc' else path.parent} exists: choose another -o, or pass "
                                     "--overwrite to replace it")
    runner = load_runner(bundle, backend=backend, precision=precision, **runner_options)
    naming = SegNaming.of(bundle, options.segment_label)
    who = provenance(bundle, runner.precision)
    rows = []
    with runner, reporter.progress(f"Segmenting {len(plan)} series on {runner.name}", len(plan)) as advance:
        for uid, (insts, forced) in plan.items():
            rows.append(_one_series(bundle, runner, uid, insts, forced, naming, who, options, out))
            advance()
    return rows


def _one_series(bundle: Bundle, runner: Any, uid: str, insts: list[Instance], forced: tuple[str, ...],
                naming: SegNaming, who: Provenance, options: SeriesOptions, out: Path) -> SegRow:
    datasets, hu = load_volume(insts)
    tally = MaskTally(bundle.spec.postprocessing)
    masks = segment_series(runner, insts, hu, observe=tally.add)
    f = features(bundle, insts, datasets[0], [slice_percentiles(s) for s in hu], forced)
    qa = assess_series(bundle, naming, f, masks, tally)
    norm = bundle.spec.normalization
    window = (norm.level, norm.width) if norm.kind == "ct_window" else (40.0, 400.0)
    result = SeriesResult(datasets, masks, naming, who, qa, voxel_mm3(datasets, f.slice_thickness), window)
    written = write_outputs(result, options.outputs, lambda kind, k: output_path(out, uid, kind, k),
                            series_uid=_seg_series_uid(uid), hu=lambda: list(hu))
    seg = written.get("seg", [Path("")])[0]
    return SegRow(uid, len(insts), int(np.count_nonzero(masks.reshape(len(masks), -1).any(axis=1))), str(seg),
                  runner.name, qa, tuple(str(p) for paths in written.values() for p in paths))


def _seg_series_uid(source_uid: str) -> str:
    """The result series of a source series: new per run (a predict is one result, not a supersession)."""
    import highdicom as hd

    del source_uid
    return str(hd.UID())
