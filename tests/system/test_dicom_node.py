"""The DICOM node and DICOM SEG, tested with real DICOM networking on 127.0.0.1.

The scanner is DCMTK (storescu, echoscu), the PACS DCMTK's storescp, run as separate
processes: no mocks (helpers in dicomnet.py). Every process a test starts is stopped by the test,
by pid. Hostile senders and instances are in test_dicom_node_crafted_input.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

import highdicom as hd
import pydicom
from dicomnet import (
    DCMTK,
    dciodvfy_errors,
    echo,
    free_port,
    need_tools,
    node,
    pacs_segs,
    storescp,
    storescu,
    wait_for,
)

from attunet_deploy import load_runner
from attunet_deploy.apps.dicom.seg import referenced_masks
from attunet_deploy.demo.ctseries import SeriesHeader, write_ct_series

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

def check_seg(seg_path: Path, slices: list, bundle: Path) -> None:
    """highdicom reads the SEG; each frame's mask equals runner.segment(hu) of its referenced slice."""
    seg = hd.seg.segread(str(seg_path))
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "attunet-deploy" and algo.AlgorithmFamilyCodeSequence[0].CodeMeaning
    src = pydicom.dcmread(slices[0].path)
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {s.sop_instance_uid for s in slices}
    masks = referenced_masks(seg_path, [s.sop_instance_uid for s in slices])
    with load_runner(bundle, backend="ort") as runner:
        expected = np.stack([runner.segment(s.hu[None, None])[0] for s in slices])
    np.testing.assert_array_equal(masks, expected)
    assert expected.any()
    empty = [i for i, m in enumerate(expected) if not m.any()]
    assert int(seg.NumberOfFrames) == len(slices) - len(empty)  # empty frames omitted


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    need_tools("storescu", "echoscu", "storescp", "dciodvfy")


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("series")
    ct = write_ct_series(root / "ct", 8, (128, 128), seed=21)
    write_ct_series(root / "mr", 1, (64, 64), seed=22, header=SeriesHeader(modality="MR"))
    write_ct_series(root / "nopix", 1, (64, 64), seed=23, pixels=False)
    return {"root": root, "ct": ct}


def test_echo_store_segment_and_forward(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", "--log-json") as (port, log, _):
        proc = subprocess.run([DCMTK["echoscu"], "-v", "-aec", "ATTDEPLOY", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Received Echo Response (Success)" in proc.stdout + proc.stderr
        statuses = storescu(port, *files(series["root"] / "ct"))
        assert statuses == ["0x0000"] * 8
        wait_for(lambda: list((out / "seg").glob("*.dcm")), 60, "the SEG")
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 60, "the forwarded SEG at storescp")
    (seg_path,) = (out / "seg").glob("*.dcm")
    check_seg(seg_path, series["ct"], demo_bundle)
    (received,) = pacs_segs(tmp_path / "pacs")
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(seg_path).SOPInstanceUID
    assert dciodvfy_errors(received) == []
    events = [json.loads(ln)["event"] for ln in log.read_text().splitlines() if ln.startswith("{")]
    assert {"listening", "received", "complete", "written", "sent", "stopped"} <= set(events)


def test_failure_statuses_then_a_valid_series(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with node(demo_bundle, out) as (port, log, proc):
        # MR in a study push: answered Success, not kept (--accept-sop-classes all, the default)
        assert storescu(port, *files(series["root"] / "mr")) == ["0x0000"]
        assert storescu(port, *files(series["root"] / "nopix")) == ["0xC000"]  # cannot understand: no pixel data
        assert proc.poll() is None and echo(port) == 0
        assert storescu(port, *files(series["root"] / "ct")) == ["0x0000"] * 8
        wait_for(lambda: list((out / "seg").glob("*.dcm")), 60, "the SEG")
    text = log.read_text()
    assert "refused: no pixel data" in text and "ignored: 1 MRImageStorage instance(s)" in text
    assert len(list((out / "seg").glob("*.dcm"))) == 1  # of the CT series only
    assert proc.returncode == 0  # SIGTERM: a clean stop


def test_kill_9_after_acknowledgement_then_restart(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with node(demo_bundle, out, quiet=60) as (port, _, proc):
        assert storescu(port, *files(series["root"] / "ct")) == ["0x0000"] * 8
        proc.kill()  # kill -9: every acknowledged instance must already be on disk
        proc.wait()
    assert len(list((out / "incoming").rglob("*.dcm"))) == 8
    with node(demo_bundle, out, quiet=0.5):
        wait_for(lambda: list((out / "seg").glob("*.dcm")), 60, "the SEG after the restart")
    check_seg(next((out / "seg").glob("*.dcm")), series["ct"], demo_bundle)


def test_forward_destination_down_then_up(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pacs_port = free_port()
    with node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs_port}") as (port, log, _):
        assert storescu(port, *files(series["root"] / "ct")) == ["0x0000"] * 8
        wait_for(lambda: "retry" in log.read_text(), 60, "a failed forward")
        assert list((out / "outbox").glob("*.dcm"))  # kept queued on disk
        with storescp(tmp_path / "pacs", port=pacs_port):
            wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG after the destination came up")
    assert not list((out / "outbox").glob("*.dcm")) and list((out / "sent").glob("*.dcm"))


def test_calling_ae_titles_can_be_restricted(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    with node(demo_bundle, tmp_path / "out", "--allow-ae", "SCANNER1") as (port, log, _):
        assert storescu(port, *files(series["root"] / "ct")) == []  # STORESCU is not allowed
        assert storescu(port, *files(series["root"] / "ct"), extra=("-aet", "SCANNER1")) == ["0x0000"] * 8
        wait_for(lambda: "rejected" in log.read_text(), 10, "the rejection in the log")


def test_file_mode_two_interleaved_series(demo_bundle: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from attunet_deploy.cli import main

    mixed = tmp_path / "mixed"
    a = write_ct_series(mixed, 5, (96, 96), seed=31, name="img_{:03d}_a.dcm", header=SeriesHeader(series_number=1))
    b = write_ct_series(mixed, 4, (96, 96), seed=32, name="img_{:03d}_b.dcm", header=SeriesHeader(series_number=2,
                                                                                                  study_uid=pydicom.dcmread(a[0].path).StudyInstanceUID))
    write_ct_series(mixed, 1, (64, 64), seed=33, name="mr_{:03d}.dcm", header=SeriesHeader(modality="MR"))
    (mixed / "notes.txt").write_text("not DICOM")
    result = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(mixed), "--dicom-seg", "-o",
                                       str(tmp_path / "segs"), "--backend", "ort"])
    assert result.exit_code == 0, result.stderr
    assert "skipped:" in result.stderr and "mr_000.dcm" in result.stderr and "notes.txt" in result.stderr
    segs = sorted((tmp_path / "segs").glob("*.dcm"))
    assert len(segs) == 2
    for slices in (a, b):
        uid = pydicom.dcmread(slices[0].path).SeriesInstanceUID
        (seg_path,) = [p for p in segs if uid in p.name]
        seg = pydicom.dcmread(seg_path)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        check_seg(seg_path, slices, demo_bundle)
    again = CliRunner().invoke(main, ["predict", "-b", str(demo_bundle), str(mixed), "--dicom-seg", "-o",
                                      str(tmp_path / "segs")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_node_options_are_validated(demo_bundle: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from attunet_deploy.cli import main

    for args, match in ((["--forward", "nonsense"], "AET@HOST:PORT"), (["--port", "0"], "--port"),
                        (["--ae-title", "X" * 17], "AE title"), (["--quiet-seconds", "nan"], "--quiet-seconds")):
        r = CliRunner().invoke(main, ["serve-dicom", "-b", str(demo_bundle), "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = CliRunner().invoke(main, ["serve-dicom", "-b", str(demo_bundle), "--out", str(tmp_path / "o"), "--bind",
                                      "127.0.0.1", "--port", str(busy.getsockname()[1]), "--backend", "ort"])
        assert r.exit_code == 2 and "cannot listen" in r.stderr, r.stderr
    finally:
        busy.close()
