"""The forwarder: results in the spool's outbox/ sent on, retried with back-off, kept on disk until
accepted: by C-STORE (``--forward``, DICOM TLS with ``--forward-tls-*``) or by DICOMweb STOW-RS
(``--forward-stow``, apps/dicom/stow.py). A sender is anything with ``send(path) -> (ok, why)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Protocol

from attunet_deploy.apps.dicom.config import ForwardTarget, ForwardTls
from attunet_deploy.apps.dicom.scp import SUCCESS
from attunet_deploy.apps.dicom.spool import Spool

FORWARD_BACKOFF_MAX_S = 60.0


class Sender(Protocol):
    """Sends one file to the destination: (accepted, why not)."""

    def send(self, path: Path) -> tuple[bool, str]: ...


class Forwarder:
    """outbox/ -> the destination (``target``: a Sender, named by its ``str``) -> sent/, one file at a
    time, oldest first."""

    def __init__(self, spool: Spool, target: Sender, stop: threading.Event) -> None:
        self.spool, self.target, self.stop = spool, target, stop
        self.outbox, self.sent = spool.dirs["outbox"], spool.dirs["sent"]

    def run(self) -> None:
        log, metrics = self.spool.log, self.spool.metrics
        delay = 0.0
        next_try = 0.0
        while not self.stop.is_set():
            try:
                pending = sorted(self.outbox.glob("*.dcm"), key=lambda p: p.stat().st_mtime)
            except OSError:  # a file went away between glob and stat
                self.stop.wait(0.2)
                continue
            if not pending or time.monotonic() < next_try:
                self.stop.wait(0.2)
                continue
            f = pending[0]
            try:
                ok, why = self.target.send(f)
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {str(exc)[:120]}"
            if ok:
                with contextlib.suppress(OSError):
                    os.replace(f, self.sent / f.name)
                metrics.count("segs_forwarded")
                log("sent", f"{f.name} forwarded to {self.target}", seg=str(f))
                delay = 0.0
            else:
                delay = min(FORWARD_BACKOFF_MAX_S, max(1.0, delay * 2))
                next_try = time.monotonic() + delay
                log("retry", f"{f.name} not forwarded to {self.target} ({why}); next try in {delay:g} s", seg=str(f))


def client_tls_context(tls: ForwardTls) -> ssl.SSLContext:
    """A client context for DICOM TLS (TLS 1.2 or newer): the PACS's certificate verified against
    ``tls.ca`` (the system's CAs without one); this node's certificate where the PACS asks for one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert and tls.key:
        ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    return ctx


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class DimseSender:
    """C-STORE to ``target`` as ``ae_title``, one association per file, each proposing the file's
    own SOP class and transfer syntax; over DICOM TLS with ``tls``, the host name checked against the
    PACS's certificate where ``target`` names a host (an address: the CA's signature alone)."""

    def __init__(self, target: ForwardTarget, ae_title: str, tls: ForwardTls | None = None) -> None:
        self.target, self.ae_title = target, ae_title
        self.tls: tuple[ssl.SSLContext, str | None] | None = None
        if tls is not None:
            ctx = client_tls_context(tls)
            by_name = not _is_address(target.host)
            ctx.check_hostname = by_name
            self.tls = (ctx, target.host if by_name else None)

    def __str__(self) -> str:
        return str(self.target) + (" (TLS)" if self.tls else "")

    def send(self, path: Path) -> tuple[bool, str]:
        import pydicom
        from pynetdicom import AE

        ds = pydicom.dcmread(str(path))
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title,
                             tls_args=self.tls)  # type: ignore[arg-type]  # (context, hostname or None)
        if not assoc.is_established:
            return False, "association not established" + (" (TLS: check --forward-tls-ca and the PACS's "
                                                           "certificate)" if self.tls else "")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(getattr(status, "Status", -1)) if status else -1
        return (code == SUCCESS, f"status 0x{code:04X}" if code >= 0 else "no response")
