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
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from attunet_deploy.apps.dicom.access import parse_hosts, server_class, tls_context
from attunet_deploy.apps.dicom.config import ForwardTarget, NodeConfig, NodeLimits, NodeLog, check_ae_title, parse_keep
from attunet_deploy.apps.dicom.forwarder import DimseSender, Forwarder, Sender
from attunet_deploy.apps.dicom.monitor import NodeMetrics, start_http
from attunet_deploy.apps.dicom.pdu import PDATA_MAX, PENDING_FACTOR, PduLimits
from attunet_deploy.apps.dicom.scp import ScpContext, handlers, make_ae
from attunet_deploy.apps.dicom.spool import Spool
from attunet_deploy.apps.dicom.worker import SegOptions, Worker
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError
from attunet_deploy.runtimes.base import Runner

__all__ = ["DicomNode", "ForwardTarget", "NodeConfig", "NodeLimits", "check_ae_title", "parse_keep"]


class DicomNode:
    """The Storage SCP, the quiet-period scheduler, one segmentation worker and the forwarder, each
    a part with its own state: the :class:`Spool` on disk, the SCP's handler functions over an
    :class:`ScpContext`, a :class:`Worker` and a :class:`Forwarder` over the spool."""

    def __init__(self, bundle: Bundle, out: str | os.PathLike[str], config: NodeConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config = config or NodeConfig()
        self.out = Path(out)
        self.allow_host = parse_hosts(list(config.allow_host))
        self.ssl_context = tls_context(config.tls_cert, config.tls_key, config.tls_ca)
        self.log = NodeLog(config.log_json)
        self.stop = threading.Event()
        self.spool = Spool(self.out, float(config.quiet_seconds), config.limits, self.log,
                           NodeMetrics(self.out, self.out / "outbox"))
        self.threads: dict[str, threading.Thread] = {}

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
        from pynetdicom import _config

        from attunet_deploy.loader import load_runner

        c = self.config
        runner = load_runner(self.bundle, backend=c.backend, precision=c.precision, **dict(c.runner_options))
        runner.activate()  # a backend that cannot run here fails now, before the port is opened
        self.spool.recover()
        # Instances stream to disk under --out while they arrive (never whole in memory), and are then
        # renamed into incoming/ on the same filesystem. This process serves only the node.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.spool.dirs["tmp"])
        ctx = ScpContext(self.spool, c.limits, self.log, self.spool.metrics, config=c)
        pdu = PduLimits(PDATA_MAX, c.limits.acse_timeout, c.limits.network_timeout, self.log)
        cls = server_class(self.allow_host, c.limits.acse_timeout, self.log, pdu,
                           PENDING_FACTOR * c.limits.max_associations)
        ae = make_ae(c)
        try:
            server = ae.make_server((c.bind, c.port), evt_handlers=handlers(ctx), ssl_context=self.ssl_context,
                                    server_class=cls)
        except OSError as exc:
            raise InputError(f"cannot listen on {c.bind}:{c.port}: {exc.strerror or exc}") from None
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it again
        http = None
        if c.http_port is not None:
            try:
                http = start_http(c.bind, c.http_port, self.spool.metrics, self.healthy)
            except OSError as exc:
                server.server_close()
                raise InputError(f"cannot listen on {c.bind}:{c.http_port} (--http-port): "
                                 f"{exc.strerror or exc}") from None
        self._start_threads(server, runner)
        try:
            self._schedule()
        finally:
            self.stop.set()  # every thread's loop ends on it
            server.shutdown()  # no new associations; the worker finishes its series or leaves it queued
            if http is not None:
                http.shutdown()
            for name, t in self.threads.items():
                if name != "scp":
                    t.join(timeout=30)
            left = self.spool.unfinished()
            self.log("stopped", "node stopped" + (f"; {left} series unfinished, picked up on the next start"
                                                  if left else ""))
        return 0

    def _start_threads(self, server: Any, runner: Runner) -> None:
        c = self.config
        target = c.forward_target
        from attunet_deploy.apps.dicom.files import provenance
        from attunet_deploy.apps.dicom.gate import Gate

        options = SegOptions(provenance(self.bundle, runner.precision), c.outputs, c.segment_label,
                             forward=target is not None or c.forward_stow is not None)
        worker = Worker(self.spool, runner, self.bundle, options, Gate.for_bundle(self.bundle, c.accept), self.stop)
        self.threads = {"scp": threading.Thread(target=server.serve_forever, name="attdeploy-scp", daemon=True),
                        "worker": threading.Thread(target=worker.run, name="attdeploy-worker", daemon=True)}
        sender = self.sender()
        if sender is not None:
            forwarder = Forwarder(self.spool, sender, self.stop)
            self.threads["forwarder"] = threading.Thread(target=forwarder.run, name="attdeploy-forwarder",
                                                         daemon=True)
        for t in self.threads.values():
            t.start()
        limits = c.limits
        self.log("listening", f"{c.ae_title} on {c.bind}:{c.port}", pid=os.getpid(),
                 out=str(self.out), forward=str(sender) if sender is not None else None,
                 accept_sop_classes=c.accept_sop_classes,
                 allow_ae=",".join(c.allow_ae) or "any", allow_host=",".join(map(str, self.allow_host)) or "any",
                 called_ae="any" if c.any_called_ae else c.ae_title, tls=self.ssl_context is not None,
                 http_port=c.http_port, max_associations=limits.max_associations,
                 max_instance_mb=limits.max_instance_mb, min_free_mb=limits.min_free_mb,
                 keep_archive="none" if limits.keep_archive_days is None else limits.keep_archive_days)

    def sender(self) -> Sender | None:
        """Where results go on: C-STORE (with DICOM TLS) or STOW-RS; None without a destination."""
        c = self.config
        if c.forward_stow is not None:
            from attunet_deploy.apps.dicom.stow import StowSender

            return StowSender(c.forward_stow)
        target = c.forward_target
        return DimseSender(target, c.ae_title, c.forward_tls) if target is not None else None

    def _schedule(self) -> None:
        """The main thread until a signal: seal quiet series, prune once a minute."""
        old = {s: signal.signal(s, lambda *_: self.stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        next_prune = 0.0
        try:
            while not self.stop.is_set():
                try:
                    self.spool.seal_quiet_series()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + 60
                        self.spool.prune()
                except Exception as exc:  # the scheduler never dies of one bad entry
                    self.log("error", f"scheduler: {type(exc).__name__}: {str(exc)[:200]}")
                self.stop.wait(0.1)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
