"""Hostile peers below DIMSE, against the node as a process on 127.0.0.1 (apps/dicom/pdu.py): a
P-DATA-TF header that claims 0xFFFFFFF0 bytes followed by a stream of data, and connections and
associations that send 6 bytes of a PDU header and go silent. The node's memory stays flat, each
is aborted within --network-timeout, and C-ECHO works throughout.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")
psutil = pytest.importorskip("psutil")

from dicomnet import echo, need_tools, node, wait_for  # noqa: E402

NETWORK_TIMEOUT = 5.0


def associate(port: int) -> object:
    """An established association (Verification) from pynetdicom as the requestor."""
    from pynetdicom import AE

    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ATTDEPLOY")
    assert assoc.is_established
    return assoc


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the node closes ``sock`` within ``within`` seconds."""
    try:
        sock.settimeout(within)
        return sock.recv(65536) == b"" or closed_by_peer(sock, within)
    except TimeoutError:
        return False
    except OSError:  # reset by the node, or already closed by the requestor's DUL that saw it end
        return True


def test_a_claimed_huge_pdu_is_aborted_before_it_is_read(demo_bundle: Path, tmp_path: Path) -> None:
    need_tools("echoscu")
    with node(demo_bundle, tmp_path / "out", "--network-timeout", str(NETWORK_TIMEOUT)) as (port, log, proc):
        wait_for(lambda: "ready" in log.read_text(), 60, "the worker's warm-up")
        rss0 = psutil.Process(proc.pid).memory_info().rss
        assoc = associate(port)
        raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
        sent, t0 = 0, time.monotonic()
        chunk = b"\0" * (1 << 20)
        try:
            raw.sendall(b"\x04\x00" + struct.pack(">L", 0xFFFFFFF0))
            while sent < 600 << 20 and time.monotonic() - t0 < 30:
                raw.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the node closed the connection: what should happen
            pass
        took = time.monotonic() - t0
        assert sent < 64 << 20, f"the node read {sent >> 20} MB of a PDU it must refuse"
        assert took < NETWORK_TIMEOUT
        grew = psutil.Process(proc.pid).memory_info().rss - rss0
        assert grew < 64 << 20, f"node memory grew {grew >> 20} MB"
        assert echo(port) == 0 and proc.poll() is None
        assert "association aborted: PDU type 0x04 of 4,294,967,280 bytes" in log.read_text()
        assoc.abort()  # type: ignore[attr-defined]


def test_stalled_pdus_hold_no_slot_and_are_dropped_within_the_network_timeout(demo_bundle: Path,
                                                                              tmp_path: Path) -> None:
    need_tools("echoscu")
    with node(demo_bundle, tmp_path / "out", "--network-timeout", str(NETWORK_TIMEOUT), "--acse-timeout", "2",
              "--max-associations", "16") as (port, log, proc):
        wait_for(lambda: "ready" in log.read_text(), 60, "the worker's warm-up")
        rss0 = psutil.Process(proc.pid).memory_info().rss
        # 32 connections that start an A-ASSOCIATE-RQ (6 of its header bytes, claiming 200 more) and stop
        raw = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        for s in raw:
            s.sendall(b"\x01\x00" + struct.pack(">L", 200))
        t_raw = time.monotonic()
        # and 4 established associations that start a P-DATA-TF PDU of 1,000 bytes and stop
        assocs = [associate(port) for _ in range(4)]
        stalled = [a.dul.socket.socket for a in assocs]  # type: ignore[attr-defined]
        for s in stalled:
            s.sendall(b"\x04\x00" + struct.pack(">L", 1000))
        t_stalled = time.monotonic()
        echoes: list[int] = []
        stop = threading.Event()

        def keep_echoing() -> None:
            while not stop.is_set():
                echoes.append(echo(port, timeout=20))
                stop.wait(0.5)

        t = threading.Thread(target=keep_echoing)
        t.start()
        try:
            assert all(closed_by_peer(s, NETWORK_TIMEOUT + 3) for s in raw)
            raw_dropped = time.monotonic() - t_raw
            assert all(closed_by_peer(s, NETWORK_TIMEOUT + 3) for s in stalled)
            stalled_dropped = time.monotonic() - t_stalled
        finally:
            stop.set()
            t.join()
            for s in raw:
                s.close()
            for a in assocs:
                a.abort()  # type: ignore[attr-defined]
        # within --network-timeout of the stall (pre-association: --acse-timeout, with thread start-up lag)
        assert raw_dropped < NETWORK_TIMEOUT, f"half-open connections held on for {raw_dropped:.1f} s"
        assert stalled_dropped < NETWORK_TIMEOUT + 1, f"stalled associations held on for {stalled_dropped:.1f} s"
        assert echoes and all(code == 0 for code in echoes), echoes  # C-ECHO answered throughout
        assert psutil.Process(proc.pid).memory_info().rss - rss0 < 64 << 20
        assert log.read_text().count("a PDU stalled") >= 36 and proc.poll() is None
