"""``attdeploy serve-dicom``: a Storage SCP that turns CT series into DICOM SEG.

Folders under ``--out`` hold the node's state on disk, so a restart (even after ``kill -9``)
loses nothing that was acknowledged. Every name below comes from a UID that was validated on
receipt (digits and dots, at most 64 characters), so no two UIDs share a name and none is ``..``:

- ``tmp/``                   instances being received (streamed to disk, never held in memory)
- ``incoming/<series>/``     instances checked and written (fsync + rename) *before* Success is returned
- ``processing/<series>~<n>/`` a series quiet for ``--quiet-seconds``, queued for the worker
- ``seg/``                   the DICOM SEGs written, ``SEG_<series>_<k>.dcm`` (k = the SEG's InstanceNumber)
- ``outbox/``                SEGs waiting to be forwarded (``--forward``), retried with back-off
- ``sent/``                  forwarded SEGs (pruned by ``--keep-archive``)
- ``archive/<series>/``      instances of segmented series (pruned by ``--keep-archive``); instances that
                             arrive after a series' SEG are segmented together with these, and the new
                             SEG supersedes the old one (same SEG series, next InstanceNumber)
- ``failed/<series>~<n>/``   series or instances that could not be segmented, with ``failed.txt``
- ``state/<series>.json``    the SEG series UID and the last SEG InstanceNumber of each source series

DICOM has no "series complete" message: a series counts as complete when no instance of it
arrived for ``--quiet-seconds`` (MONAI Deploy's gateway waits 5 s, Orthanc's StableAge 60 s).
"""

from __future__ import annotations

import os
import queue
import signal
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from attunet_deploy.apps.dicom.access import parse_hosts, server_class, tls_context
from attunet_deploy.apps.dicom.forwarder import Forwarder, ForwardTarget
from attunet_deploy.apps.dicom.monitor import NodeMetrics, start_http
from attunet_deploy.apps.dicom.scp import StorageScp
from attunet_deploy.apps.dicom.state import NodeLimits, NodeLog, check_ae_title, parse_keep
from attunet_deploy.apps.dicom.worker import Worker
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError

__all__ = ["DicomNode", "ForwardTarget", "NodeLimits", "check_ae_title", "parse_keep"]


class DicomNode(StorageScp, Worker, Forwarder):
    """The Storage SCP, the quiet-period scheduler, one segmentation worker and the forwarder."""

    def __init__(self, bundle: Bundle, out: str | os.PathLike[str], *, port: int = 11112,
                 ae_title: str = "ATTDEPLOY", bind: str = "0.0.0.0", allow_ae: list[str] | None = None,
                 quiet_seconds: float = 5.0, forward: str | None = None, log_json: bool = False,
                 backend: str = "auto", precision: str = "fp32", segment_label: str = "Target",
                 runner_options: dict[str, Any] | None = None, limits: NodeLimits | None = None,
                 any_called_ae: bool = False, allow_host: list[str] | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None, http_port: int | None = None) -> None:
        if not 0 < port < 65536:
            raise InputError(f"--port {port}: must be in 1..65535")
        if http_port is not None and not 0 < http_port < 65536:
            raise InputError(f"--http-port {http_port}: must be in 1..65535")
        if not 0.1 <= quiet_seconds <= 3600:
            raise InputError(f"--quiet-seconds {quiet_seconds}: must be in 0.1..3600")
        self.bundle = bundle
        self.out = Path(out)
        self.port = port
        self.http_port = http_port
        self.ae_title = check_ae_title(ae_title)
        self.bind = bind
        self.allow_ae = [check_ae_title(a, "--allow-ae") for a in (allow_ae or [])]
        self.any_called_ae = any_called_ae
        self.allow_host = parse_hosts(list(allow_host or []))
        self.ssl_context = tls_context(tls_cert, tls_key, tls_ca)
        self.limits = (limits or NodeLimits()).check()
        self.quiet = float(quiet_seconds)
        self.forward = ForwardTarget.parse(forward) if forward else None
        self.log = NodeLog(log_json)
        self.backend, self.precision = backend, precision
        self.segment_label = segment_label
        self.runner_options = runner_options or {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.writers: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.jobs: queue.Queue[Path] = queue.Queue()
        self.queued: set[str] = set()
        #: masks segmented while a series was still arriving (2D model: slices are independent)
        self.masks: dict[tuple[str, int, int], Any] = {}
        self.mask_bytes = 0
        #: bytes received on each association since its last C-STORE (bounds a streamed instance)
        self.received_bytes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.threads: dict[str, threading.Thread] = {}
        self.dirs = {name: self.out / name for name in ("tmp", "incoming", "processing", "seg", "outbox", "sent",
                                                          "archive", "failed", "state")}
        self.metrics = NodeMetrics(self.out, self.dirs["outbox"])

    # ------------------------------------------------------------------ run
    def healthy(self) -> tuple[bool, str]:
        """(ok, why) for /healthz: the SCP accepts and every thread of the node is alive."""
        if self.stop.is_set():
            return False, "stopping"
        dead = [name for name, t in self.threads.items() if not t.is_alive()]
        if dead:
            return False, "dead: " + ", ".join(dead)
        return True, "ok"

    def serve(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0)."""
        from pynetdicom import _config, evt

        from attunet_deploy.runtimes.select import load_runner

        runner = load_runner(self.bundle, backend=self.backend, precision=self.precision, **self.runner_options)
        runner.activate()  # a backend that cannot run here fails now, before the port is opened
        self._recover()
        # Instances stream to disk under --out while they arrive (never whole in memory), and are then
        # renamed into incoming/ on the same filesystem. This process serves only the node.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.dirs["tmp"])
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected),
                    (evt.EVT_DATA_RECV, self._handle_data), (evt.EVT_CONN_CLOSE, self._handle_closed)]
        ae = self._ae()
        cls = server_class(self.allow_host, self.limits.acse_timeout, self.log)
        try:
            server = ae.make_server((self.bind, self.port), evt_handlers=handlers, ssl_context=self.ssl_context,
                                    server_class=cls)
        except OSError as exc:
            raise InputError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}") from None
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it again
        http = None
        if self.http_port is not None:
            try:
                http = start_http(self.bind, self.http_port, self.metrics, self.healthy)
            except OSError as exc:
                server.server_close()
                raise InputError(f"cannot listen on {self.bind}:{self.http_port} (--http-port): "
                                 f"{exc.strerror or exc}") from None
        self.threads = {"scp": threading.Thread(target=server.serve_forever, name="attdeploy-scp", daemon=True),
                        "worker": threading.Thread(target=self._run_worker, args=(runner,), name="attdeploy-worker",
                                                   daemon=True)}
        if self.forward is not None:
            self.threads["forwarder"] = threading.Thread(target=self._forwarder, name="attdeploy-forwarder",
                                                         daemon=True)
        for t in self.threads.values():
            t.start()
        old = {s: signal.signal(s, lambda *_: self.stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        self.log("listening", f"{self.ae_title} on {self.bind}:{self.port}", pid=os.getpid(),
                 out=str(self.out), forward=str(self.forward) if self.forward else None,
                 allow_ae=",".join(self.allow_ae) or "any", allow_host=",".join(map(str, self.allow_host)) or "any",
                 called_ae="any" if self.any_called_ae else self.ae_title, tls=self.ssl_context is not None,
                 http_port=self.http_port, max_associations=self.limits.max_associations,
                 max_instance_mb=self.limits.max_instance_mb, min_free_mb=self.limits.min_free_mb,
                 keep_archive="none" if self.limits.keep_archive_days is None else self.limits.keep_archive_days)
        next_prune = 0.0
        try:
            while not self.stop.is_set():
                try:
                    self._seal_quiet_series()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + 60
                        self._prune()
                except Exception as exc:  # the scheduler never dies of one bad entry
                    self.log("error", f"scheduler: {type(exc).__name__}: {str(exc)[:200]}")
                self.stop.wait(0.1)
        finally:
            self.stop.set()  # every thread's loop ends on it
            server.shutdown()  # no new associations; the worker finishes its series or leaves it queued
            if http is not None:
                http.shutdown()
            for name, t in self.threads.items():
                if name != "scp":
                    t.join(timeout=30)
            for s, h in old.items():
                signal.signal(s, h)
            self.log("stopped", "node stopped; unfinished work is picked up on the next start")
        return 0
