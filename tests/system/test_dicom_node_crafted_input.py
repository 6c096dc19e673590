"""Crafted instances and peers at the DICOM node: one crafted instance must never crash the node,
lose acknowledged data or reach the PACS.

A regression test per finding of the issue, each against the real node process on 127.0.0.1 with
DCMTK as the sender. Each asserts the status the sender saw, that the node still answers C-ECHO,
what the PACS received, and that every forwarded SEG passes dciodvfy with no error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

import highdicom as hd
import pydicom
from dicomnet import (
    DCMTK,
    craft,
    dciodvfy_errors,
    echo,
    events,
    free_port,
    http_get,
    make_certs,
    metric,
    node,
    pacs_segs,
    storescp,
    storescu,
    wait_for,
)
from pydicom.uid import generate_uid

from attunet_deploy import load_runner
from attunet_deploy.apps.dicom.seg import referenced_masks
from attunet_deploy.demo.ctseries import SeriesHeader, write_ct_series

SPOOL = {"tmp", "incoming", "processing", "seg", "outbox", "sent", "archive", "failed", "state"}


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    from dicomnet import need_tools

    need_tools("storescu", "echoscu", "storescp", "dciodvfy")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("hostile-series")
    return {"root": root, "ct8": write_ct_series(root / "ct8", 8, (96, 96), seed=41),
            "ct12": write_ct_series(root / "ct12", 12, (96, 96), seed=42),
            "mr": write_ct_series(root / "mr", 1, (64, 64), seed=43, header=SeriesHeader(modality="MR"))}


def expected_masks(bundle: Path, slices: list) -> np.ndarray:
    with load_runner(bundle, backend="ort") as runner:
        return np.stack([runner.segment(s.hu[None, None])[0] for s in slices])


def check_seg(seg_path: Path, slices: list, bundle: Path) -> pydicom.Dataset:
    """dciodvfy finds no error; the SEG references exactly ``slices``; each frame's mask equals a
    separate inference of its referenced slice."""
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(str(seg_path))
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.sop_instance_uid for s in slices}
    masks = referenced_masks(seg_path, [s.sop_instance_uid for s in slices])
    np.testing.assert_array_equal(masks, expected_masks(bundle, slices))
    return pydicom.dcmread(seg_path)


def files(paths: list) -> list[Path]:
    return [s.path for s in paths]


def out_root_is_clean(out: Path) -> None:
    """Nothing but the node's own folders at the --out root (finding 1 left a file there)."""
    assert {p.name for p in out.iterdir()} <= SPOOL | {".lock"}, sorted(p.name for p in out.iterdir())
    assert all(p.is_dir() for p in out.iterdir() if p.name in SPOOL)


# ---------------------------------------------------------------- findings 1 and 2: "..", "."
def test_dot_series_uids_are_refused_and_acknowledged_slices_are_kept(demo_bundle: Path, series: dict,
                                                                        tmp_path: Path) -> None:
    ct12 = series["ct12"]
    dotdot = craft(ct12[0].path, tmp_path / "x" / "dotdot.dcm", SeriesInstanceUID="..",
                   SOPInstanceUID=generate_uid())
    dot = craft(ct12[1].path, tmp_path / "x" / "dot.dcm", SeriesInstanceUID=".", SOPInstanceUID=generate_uid())
    out = tmp_path / "out"
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", "--log-json", quiet=2) as (port, log, proc):
        assert storescu(port, *files(ct12[:6])) == ["0x0000"] * 6
        assert storescu(port, dot) == ["0xC000"]
        assert storescu(port, dotdot) == ["0xC000"]
        assert echo(port) == 0
        assert storescu(port, *files(ct12[6:])) == ["0x0000"] * 6
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG at the PACS")
        time.sleep(3)  # a second (partial) SEG would arrive now
        assert proc.poll() is None and echo(port) == 0
    (seg,) = pacs_segs(tmp_path / "pacs")
    check_seg(seg, ct12, demo_bundle)  # all 12 acknowledged slices, none lost
    out_root_is_clean(out)
    refused = [e for e in events(log) if e["event"] == "refused"]
    assert len(refused) == 2 and all(e["status"] == "0xC000" and "SeriesInstanceUID" in e["message"] for e in refused)
    assert proc.returncode == 0


# ---------------------------------------------------------------- findings 3, 4 and 5: invalid UIDs
def test_invalid_uids_are_refused_and_never_reach_the_pacs(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    ct8 = series["ct8"]
    base = ct8[0].sop_instance_uid
    long_series = "1.2." + "3" * 118
    crafted = {
        "sop 1a": {"SOPInstanceUID": base[:50] + ".999.1a"},
        "sop 1b": {"SOPInstanceUID": base[:50] + ".999.1b"},
        "long series x": {"SeriesInstanceUID": long_series + ".1", "SOPInstanceUID": generate_uid()},
        "long series y": {"SeriesInstanceUID": long_series + ".2", "SOPInstanceUID": generate_uid()},
        "slash in study": {"StudyInstanceUID": "1.2.3/4", "SOPInstanceUID": generate_uid()},
        "letters in frame of reference": {"FrameOfReferenceUID": "1.2.abc", "SOPInstanceUID": generate_uid()},
        "sop of 70 characters": {"SOPInstanceUID": "1.2." + "4" * 66},
        "leading zero": {"SeriesInstanceUID": "1.02.3", "SOPInstanceUID": generate_uid()},
        "no frame of reference": {"FrameOfReferenceUID": None, "SOPInstanceUID": generate_uid()},
    }
    out = tmp_path / "out"
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", "--log-json") as (port, log, proc):
        for i, (name, changes) in enumerate(crafted.items()):
            path = craft(ct8[i % 8].path, tmp_path / "x" / f"{i}.dcm", **changes)
            assert storescu(port, path) == ["0xC000"], name
        assert echo(port) == 0
        assert storescu(port, *files(ct8)) == ["0x0000"] * 8
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG at the PACS")
        time.sleep(2)
        assert proc.poll() is None and echo(port) == 0
    (seg,) = pacs_segs(tmp_path / "pacs")  # only the valid series' SEG was forwarded
    ds = check_seg(seg, ct8, demo_bundle)
    src = pydicom.dcmread(ct8[0].path)
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert len([e for e in events(log) if e["event"] == "refused"]) == len(crafted)
    stored = list((out / "archive").rglob("*.dcm")) + list((out / "incoming").rglob("*.dcm"))
    assert len(stored) == 8  # nothing of the crafted instances was kept
    out_root_is_clean(out)


# ---------------------------------------------------------------- findings 6 and 7: pixel data
def test_bad_pixel_data_is_refused_on_receipt_and_the_series_goes_on(demo_bundle: Path, series: dict,
                                                                      tmp_path: Path) -> None:
    ct8 = series["ct8"]
    good, last = ct8[:7], ct8[7]
    px = pydicom.dcmread(last.path).PixelData
    bad = {
        "short": craft(last.path, tmp_path / "x" / "short.dcm", PixelData=px[:1000]),
        "empty": craft(last.path, tmp_path / "x" / "empty.dcm", PixelData=b""),
        "32 bits on 16-bit data": craft(last.path, tmp_path / "x" / "b32.dcm", BitsAllocated=32, BitsStored=32,
                                        HighBit=31),
        "rows claim more": craft(last.path, tmp_path / "x" / "rows.dcm", Rows=192),
        "two samples": craft(last.path, tmp_path / "x" / "spp.dcm", SamplesPerPixel=2),
    }
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "out", "--forward", f"PACS@127.0.0.1:{pacs}", quiet=2) as (port, log, proc):
        assert storescu(port, *files(good), bad["short"]) == ["0x0000"] * 7 + ["0xC000"]
        for name, path in bad.items():
            assert storescu(port, path) == ["0xC000"], name
        assert echo(port) == 0
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG of the 7 good slices")
        assert proc.poll() is None
    (seg,) = pacs_segs(tmp_path / "pacs")
    check_seg(seg, good, demo_bundle)
    assert "the attributes and the pixel data disagree" in log.read_text()


def test_a_stored_slice_that_no_longer_decodes_is_left_out_not_the_series(demo_bundle: Path, series: dict,
                                                                           tmp_path: Path) -> None:
    ct8 = series["ct8"]
    out = tmp_path / "out"
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", "--log-json", quiet=4) as (port, log, _):
        assert storescu(port, *files(ct8)) == ["0x0000"] * 8
        uid = pydicom.dcmread(ct8[0].path).SeriesInstanceUID
        victim = out / "incoming" / uid / f"{ct8[3].sop_instance_uid}.dcm"
        data = victim.read_bytes()
        tmp = victim.with_name(".corrupt")
        tmp.write_bytes(data[: len(data) - 5000])  # the disk lost the tail of one acknowledged file
        os.replace(tmp, victim)
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG without the damaged slice")
        assert echo(port) == 0
    (seg,) = pacs_segs(tmp_path / "pacs")
    check_seg(seg, ct8[:3] + ct8[4:], demo_bundle)
    (left,) = (out / "failed").iterdir()
    assert (left / f"{ct8[3].sop_instance_uid}.dcm").exists() and "cannot decode" in (left / "failed.txt").read_text()
    assert any(e["event"] == "left-out" and e["sop_instance"] == ct8[3].sop_instance_uid for e in events(log))


# ---------------------------------------------------------------- finding 8: idle sockets
def test_silent_sockets_do_not_lock_senders_out(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "out", "--acse-timeout", "3", "--forward", f"PACS@127.0.0.1:{pacs}"
                 ) as (port, _, proc):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
        try:
            t0 = time.monotonic()
            assert echo(port, timeout=10) == 0
            assert time.monotonic() - t0 < 10
            # two slices: a 1-slice series is refused by the acceptance gate's defaults
            assert storescu(port, *(s.path for s in series["ct8"][:2])) == ["0x0000"] * 2
            time.sleep(4.5)  # --acse-timeout 3: the node has dropped every silent socket by now
            for s in socks:
                s.settimeout(5)
                assert s.recv(1024) == b""  # closed by the node (ARTIM expired)
        finally:
            for s in socks:
                s.close()
        assert proc.poll() is None and echo(port) == 0
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG at the PACS")
    (seg,) = pacs_segs(tmp_path / "pacs")
    check_seg(seg, series["ct8"][:2], demo_bundle)


# ---------------------------------------------------------------- finding 9: size and disk limits
def _padded(src: Path, dst: Path, mb: int) -> Path:
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0009, "ATTDEPLOY TEST", create=True)
    block.add_new(0x10, "OB", b"\0" * (mb << 20))
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_size_disk_and_archive_limits(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    import psutil

    ct8 = series["ct8"]
    big = _padded(ct8[0].path, tmp_path / "big.dcm", 6)
    huge = _padded(ct8[1].path, tmp_path / "huge.dcm", 150)
    hp = free_port()
    out = tmp_path / "out"
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, out, "--max-instance-mb", "4", "--keep-archive", "none", "--http-port", str(hp),
                 "--forward", f"PACS@127.0.0.1:{pacs}", quiet=1.5) as (port, log, proc):
        wait_for(lambda: "ready" in log.read_text(), 60, "the worker's warm-up (its buffers are not the point here)")
        rss0 = psutil.Process(proc.pid).memory_info().rss
        assert storescu(port, big) == ["0xA700"]  # above --max-instance-mb: out of resources
        assert storescu(port, huge) == []  # past 4 x the limit while streaming: the association is aborted
        grew = psutil.Process(proc.pid).memory_info().rss - rss0
        assert grew < 60 << 20, f"node memory grew {grew >> 20} MB receiving 156 MB"  # streamed to disk
        assert echo(port) == 0
        assert storescu(port, *files(ct8)) == ["0x0000"] * 8
        wait_for(lambda: list((out / "seg").glob("*.dcm")), 90, "the SEG")
        wait_for(lambda: not list((out / "archive").rglob("*.dcm")), 10, "--keep-archive none to drop the instances")
        assert not list((out / "tmp").iterdir()) and not list((out / "incoming").rglob("*.dcm"))
        _, text = http_get(hp, "/metrics")
        assert metric(text, "attdeploy_instances_refused_total", status="0xA700") == 1
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG at the PACS")
    (seg,) = pacs_segs(tmp_path / "pacs")  # the refused instances produced nothing
    check_seg(seg, ct8, demo_bundle)
    with node(demo_bundle, tmp_path / "out2", "--min-free-mb", str(10**9)) as (port, _, _):
        assert storescu(port, ct8[0].path) == ["0xA700"]  # below the free-disk floor
        assert echo(port) == 0


# ---------------------------------------------------------------- finding 10: restarts and resends
def test_kill_9_mid_series_then_resend_gives_one_seg(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    ct12 = series["ct12"]
    out = tmp_path / "out"
    pacs_dir = tmp_path / "pacs"
    with storescp(pacs_dir) as pacs:
        with node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", quiet=4) as (port, _, proc):
            assert storescu(port, *files(ct12[:7])) == ["0x0000"] * 7
            proc.kill()  # kill -9 mid-series
            proc.wait()
        with node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}", quiet=4) as (port, _, proc):
            assert storescu(port, *files(ct12)) == ["0x0000"] * 12  # the scanner resends the whole series
            wait_for(lambda: pacs_segs(pacs_dir), 90, "the SEG")
            time.sleep(5)
            assert echo(port) == 0
    (seg,) = pacs_segs(pacs_dir)  # one SEG, of the whole series
    check_seg(seg, ct12, demo_bundle)
    assert len(list((out / "seg").glob("*.dcm"))) == 1


def test_late_instances_give_a_superseding_seg_in_the_same_series(demo_bundle: Path, series: dict,
                                                                   tmp_path: Path) -> None:
    ct8 = series["ct8"]
    out = tmp_path / "out"
    pacs_dir = tmp_path / "pacs"
    with storescp(pacs_dir) as pacs, node(demo_bundle, out, "--forward", f"PACS@127.0.0.1:{pacs}") as (port, _, _):
        assert storescu(port, *files(ct8[:4])) == ["0x0000"] * 4
        wait_for(lambda: len(pacs_segs(pacs_dir)) == 1, 90, "the first SEG")
        assert storescu(port, *files(ct8[4:]), ct8[0].path) == ["0x0000"] * 5  # late ones and one resend
        wait_for(lambda: len(pacs_segs(pacs_dir)) == 2, 90, "the second SEG")
        assert echo(port) == 0
    first, second = sorted((pydicom.dcmread(p) for p in pacs_segs(pacs_dir)), key=lambda d: int(d.InstanceNumber))
    assert first.SeriesInstanceUID == second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID
    assert (int(first.InstanceNumber), int(second.InstanceNumber)) == (1, 2)
    newer = next(p for p in pacs_segs(pacs_dir) if pydicom.dcmread(p).SOPInstanceUID == second.SOPInstanceUID)
    check_seg(newer, ct8, demo_bundle)  # the new SEG covers the whole series
    local = sorted((out / "seg").glob("*.dcm"))
    assert len(local) == 2 and len({pydicom.dcmread(p).SOPInstanceUID for p in local}) == 2  # nothing overwritten


# ---------------------------------------------------------------- finding 11: JPEG Lossless SV1
def test_jpeg_lossless_sv1_from_dcmcjpeg(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    from dicomnet import need_tools

    need_tools("dcmcjpeg")
    ct8 = series["ct8"]
    jpeg = []
    for s in ct8:
        dst = tmp_path / "jpeg" / s.path.name
        dst.parent.mkdir(exist_ok=True)
        subprocess.run([DCMTK["dcmcjpeg"], str(s.path), str(dst)], check=True, capture_output=True, timeout=60)
        jpeg.append(dst)
    assert pydicom.dcmread(jpeg[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"  # Lossless SV1
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "out", "--forward", f"PACS@127.0.0.1:{pacs}") as (port, _, _):
        # -xs: propose JPEG Lossless SV1, as a scanner set to send it does (DCMTK's default is uncompressed)
        assert storescu(port, *jpeg, extra=("-xs",)) == ["0x0000"] * 8
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG")
        assert echo(port) == 0
    (seg,) = pacs_segs(tmp_path / "pacs")
    check_seg(seg, ct8, demo_bundle)  # lossless: the same masks as the uncompressed series


# ---------------------------------------------------------------- finding 12: access control
def test_called_and_calling_ae_titles_hosts_and_negotiation(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    ct8 = series["ct8"]
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "a", "--allow-ae", "SCANNER1", "--accept-sop-classes", "ct", "--forward",
                 f"PACS@127.0.0.1:{pacs}"
                 ) as (port, log, proc):
        assert echo(port, "ATTDEPLOY", "-aet", "SCANNER1") == 0
        assert echo(port, "WRONG", "-aet", "SCANNER1") != 0  # called AE title must be ours
        assert echo(port, "ATTDEPLOY", "-aet", "scanner1") != 0  # exact comparison, as DICOM does
        assert echo(port, "ATTDEPLOY") != 0  # ECHOSCU is not allowed
        # strict mode: MR is not offered at negotiation, the sender gets no presentation context
        assert storescu(port, series["mr"][0].path, extra=("-aet", "SCANNER1")) == []
        assert storescu(port, ct8[0].path, ct8[1].path, extra=("-aet", "SCANNER1")) == ["0x0000"] * 2
        assert proc.poll() is None
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG at the PACS")
    (seg,) = pacs_segs(tmp_path / "pacs")  # one SEG: of the allowed sender's CT instances, nothing of the MR
    check_seg(seg, ct8[:2], demo_bundle)
    text = log.read_text()
    assert text.count("rejected: association refused") >= 3
    # the operator's log says why, as the sender was told (issue 35)
    assert "association refused: called AE title 'WRONG' is not this node's 'ATTDEPLOY'" in text
    assert "association refused: calling AE title 'scanner1' is not in --allow-ae" in text
    assert "association refused: calling AE title 'ECHOSCU' is not in --allow-ae" in text
    assert "echo: C-ECHO from SCANNER1 answered" in text
    assert "association: association from SCANNER1 at 127.0.0.1" in text
    refused = [ln for ln in text.splitlines() if "refused at negotiation (not negotiated by this node" in ln]
    assert refused and all("MRImageStorage" in ln for ln in refused)  # the MR context, named
    assert "released: association from SCANNER1 released" in text
    with node(demo_bundle, tmp_path / "b", "--any-called-ae", "--allow-host", "10.0.0.0/8") as (port, log, _):
        assert echo(port, "WRONG") != 0  # 127.0.0.1 is not in --allow-host
        assert "not in --allow-host" in log.read_text()
    with node(demo_bundle, tmp_path / "c", "--any-called-ae", "--allow-host", "127.0.0.1") as (port, _, _):
        assert echo(port, "WRONG") == 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("tls"))


def test_tls(demo_bundle: Path, series: dict, certs: dict[str, Path], tmp_path: Path) -> None:
    tls = ("+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"]))
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "out", "--tls-cert", str(certs["server.crt"]), "--tls-key",
                 str(certs["server.key"]), "--tls-ca", str(certs["ca.crt"]), "--acse-timeout", "3", "--forward",
                 f"PACS@127.0.0.1:{pacs}") as (port, _, proc):
        silent = socket.create_connection(("127.0.0.1", port))  # never starts its handshake
        try:
            assert echo(port, "ATTDEPLOY", *tls) == 0
            assert echo(port) != 0  # plain DICOM to a TLS node fails
            assert echo(port, "ATTDEPLOY", "+tls", str(certs["server.key"]), str(certs["server.crt"]), "+cf",
                        str(certs["ca.crt"])) == 0  # any certificate from the CA
            assert echo(port, "ATTDEPLOY", "+tla", "-ic") != 0  # no client certificate: refused (--tls-ca)
            assert storescu(port, *files(series["ct8"]), extra=tls) == ["0x0000"] * 8
        finally:
            silent.close()
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG")
        assert proc.poll() is None
    check_seg(pacs_segs(tmp_path / "pacs")[0], series["ct8"], demo_bundle)


# ---------------------------------------------------------------- operable: /metrics and /healthz
def test_metrics_count_what_was_sent(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    ct8 = series["ct8"]
    bad = craft(ct8[0].path, tmp_path / "bad.dcm", SOPInstanceUID="1.2.3.4a")
    hp = free_port()
    with storescp(tmp_path / "pacs") as pacs, \
            node(demo_bundle, tmp_path / "out", "--forward", f"PACS@127.0.0.1:{pacs}", "--http-port", str(hp)
                 ) as (port, _, _):
        assert http_get(hp, "/healthz") == (200, "ok\n")
        assert storescu(port, *files(ct8)) == ["0x0000"] * 8
        assert storescu(port, bad) == ["0xC000"]
        assert storescu(port, bad) == ["0xC000"]
        wait_for(lambda: pacs_segs(tmp_path / "pacs"), 90, "the SEG")
        wait_for(lambda: metric(http_get(hp, "/metrics")[1], "attdeploy_segs_forwarded_total") == 1, 10,
                 "the forward to be counted")
        code, text = http_get(hp, "/metrics")
        assert code == 200
        assert metric(text, "attdeploy_instances_received_total") == 8
        assert metric(text, "attdeploy_instances_refused_total", status="0xC000") == 2
        assert metric(text, "attdeploy_series_segmented_total") == 1
        assert metric(text, "attdeploy_segs_written_total") == 1
        assert metric(text, "attdeploy_segs_queued") == 0
        assert metric(text, "attdeploy_inference_seconds_count") == 1
        assert metric(text, "attdeploy_free_disk_bytes") > 0
        assert http_get(hp, "/nope")[0] == 404
    assert dciodvfy_errors(pacs_segs(tmp_path / "pacs")[0]) == []


def test_healthz_turns_503_when_the_worker_dies(demo_bundle: Path, series: dict, tmp_path: Path) -> None:
    hp = free_port()
    with node(demo_bundle, tmp_path / "out", "--http-port", str(hp), env={"ATTDEPLOY_NODE_FAULT": "worker"}
              ) as (port, log, proc):
        wait_for(lambda: "ready" in log.read_text(), 60, "the worker")
        assert http_get(hp, "/healthz")[0] == 200
        assert storescu(port, *files(series["ct8"])) == ["0x0000"] * 8
        wait_for(lambda: http_get(hp, "/healthz")[0] == 503, 30, "/healthz to report the dead worker")
        assert "worker" in http_get(hp, "/healthz")[1]
        assert echo(port) == 0  # the SCP itself still answers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert list((tmp_path / "out" / "processing").iterdir())  # the series waits for the next start
