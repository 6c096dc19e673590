"""The forwarder: SEGs in the spool's outbox/ sent on by C-STORE (``--forward``), retried with
back-off, kept on disk until accepted.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from attunet_deploy.apps.dicom.config import ForwardTarget
from attunet_deploy.apps.dicom.scp import SUCCESS
from attunet_deploy.apps.dicom.spool import Spool

FORWARD_BACKOFF_MAX_S = 60.0


class Forwarder:
    """outbox/ -> the forward destination -> sent/, one file at a time, oldest first."""

    def __init__(self, spool: Spool, target: ForwardTarget, ae_title: str, stop: threading.Event) -> None:
        self.spool, self.target, self.ae_title, self.stop = spool, target, ae_title, stop
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
                ok, why = self.send(f)
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

    def send(self, path: Path) -> tuple[bool, str]:
        import pydicom
        from pynetdicom import AE

        ds = pydicom.dcmread(str(path))
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.ae_title)
        if not assoc.is_established:
            return False, "association not established"
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = int(getattr(status, "Status", -1)) if status else -1
        return (code == SUCCESS, f"status 0x{code:04X}" if code >= 0 else "no response")
