"""The Storage SCP's handlers: each C-STORE checked (UIDs, pixel data, size, disk) and on disk
before Success is returned; failure statuses otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from attunet_deploy import limits as _limits
from attunet_deploy.apps.dicom.checks import is_valid_uid, pixel_problem, uid_problem
from attunet_deploy.apps.dicom.state import NodeState
from attunet_deploy.fileio import fsync_dir
from attunet_deploy.io.dicom import CT_IMAGE_STORAGE, header_of
from attunet_deploy.io.dicom_series import geometry_problem, unusable_reason

#: C-STORE statuses (PS3.4 Annex B, PS3.7 Annex C).
SUCCESS = 0x0000


SOP_CLASS_NOT_SUPPORTED = 0x0122


DATASET_DOES_NOT_MATCH = 0xA900


CANNOT_UNDERSTAND = 0xC000


OUT_OF_RESOURCES = 0xA700


#: An instance streaming in past this multiple of --max-instance-mb aborts its association.
STREAM_CEILING = 4


class Refused(Exception):
    """A C-STORE answered with a failure status (the status and the reason for the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class StorageScp(NodeState):
    """pynetdicom event handlers and the AE they are served by."""

    # ------------------------------------------------------------------ storage SCP
    def _handle_store(self, event: Any) -> int:
        calling = str(getattr(event.assoc.requestor, "ae_title", "?")).strip()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        self.received_bytes[event.assoc] = 0
        try:
            inst, target = self._store(event)
        except Refused as exc:
            code = f"0x{exc.status:04X}"
            self.metrics.count("refused", status=code)
            self.log("refused", str(exc), sop_instance=sop_uid[:80], calling_ae=calling, status=code)
            return exc.status
        except Exception as exc:  # a bug must cost one instance a failure status, never the node
            self.metrics.count("refused", status="0xC000")
            self.log("refused", f"unexpected {type(exc).__name__}: {str(exc)[:160]}", sop_instance=sop_uid[:80],
                     calling_ae=calling, status="0xC000")
            return CANNOT_UNDERSTAND
        self.metrics.count("received")
        self.log("received", f"CT instance {inst.instance_number or '?'} of series {inst.series_uid}",
                 sop_instance=sop_uid, calling_ae=calling, path=str(target))
        return SUCCESS

    def _store(self, event: Any) -> tuple[Any, Path]:
        """Check one C-STORE and write its instance into incoming/; Refused(status) otherwise."""
        import pydicom

        from attunet_deploy.io.dicom import has_pixel_data

        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        src = Path(event.dataset_path)  # streamed to tmp/ by pynetdicom (STORE_RECV_CHUNKED_DATASET)
        size = src.stat().st_size
        if size > self.limits.max_instance_mb * 2**20:
            raise Refused(OUT_OF_RESOURCES, f"instance of {size / 2**20:,.1f} MB is above --max-instance-mb "
                                            f"{self.limits.max_instance_mb:g}")
        free = shutil.disk_usage(self.out).free
        if free < self.limits.min_free_mb * 2**20 + size:
            raise Refused(OUT_OF_RESOURCES, f"{free / 2**20:,.0f} MB free under {self.out}, below --min-free-mb "
                                            f"{self.limits.min_free_mb:g}")
        if sop_class != CT_IMAGE_STORAGE:
            raise Refused(SOP_CLASS_NOT_SUPPORTED, f"only CT Image Storage is segmented (got {sop_class[:70]})")
        if not is_valid_uid(sop_uid):
            raise Refused(CANNOT_UNDERSTAND, f"Affected SOP Instance UID {sop_uid[:80]!r} is not a valid DICOM UID")
        try:
            ds = pydicom.dcmread(str(src))
            transfer_syntax = ds.file_meta.TransferSyntaxUID
        except Exception as exc:
            raise Refused(CANNOT_UNDERSTAND, f"cannot decode the dataset: {str(exc)[:120]}") from None
        problem = uid_problem(ds, sop_class, sop_uid)
        if problem:
            raise Refused(*problem)
        inst = header_of(ds, src, has_pixel_data(ds))
        reason = unusable_reason(inst) or geometry_problem(inst) or \
            pixel_problem(ds, transfer_syntax, _limits.IMAGE_PIXELS.bytes())
        if reason:
            raise Refused(CANNOT_UNDERSTAND, reason)
        series = inst.series_uid
        with self.lock:
            self.writers[series] = self.writers.get(series, 0) + 1
        try:
            target = self.dirs["incoming"] / series / f"{sop_uid}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(src, 0o644)
            os.replace(src, target)  # a resend of the same SOP instance replaces it
            fsync_dir(target.parent)
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror or exc}") from None
        finally:
            with self.lock:
                self.writers[series] -= 1
                self.last_seen[series] = time.monotonic()
        return inst, target

    def _handle_data(self, event: Any) -> None:
        """Bound an instance while it streams in: past STREAM_CEILING x --max-instance-mb, or when the
        disk under --out falls below half of --min-free-mb, the association is aborted. Between the
        limit and the ceiling the instance is received (on disk, not in memory) and refused with
        0xA700, so the sender is told why."""
        before = self.received_bytes.get(event.assoc, 0)
        n = before + len(event.data)
        self.received_bytes[event.assoc] = n
        if before >> 24 == n >> 24:  # checked once per 16 MiB received
            return
        why = None
        if n > STREAM_CEILING * self.limits.max_instance_mb * 2**20:
            why = f"more than {STREAM_CEILING} x --max-instance-mb {self.limits.max_instance_mb:g} for one instance"
        elif shutil.disk_usage(self.out).free < self.limits.min_free_mb * 2**19:
            why = f"the disk under {self.out} fell below half of --min-free-mb {self.limits.min_free_mb:g}"
        if why:
            self.log("aborted", f"association aborted: {why}", calling_ae=str(event.assoc.requestor.ae_title).strip())
            self.metrics.count("refused", status="abort")
            event.assoc.abort()

    def _handle_closed(self, event: Any) -> None:
        """An association that ended mid-instance (aborted, dropped) leaves pynetdicom's partial file
        in tmp/: it was never acknowledged, so it goes."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.close()
                os.unlink(partial.name)

    def _handle_rejected(self, event: Any) -> None:
        self.log("rejected", "association refused", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                 address=event.assoc.requestor.address)

    def _ae(self) -> Any:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

        ae = AE(ae_title=self.ae_title)
        # Negotiation offers only what the node processes: CT Image Storage in the transfer syntaxes it
        # can decode, and Verification. Anything else is refused at association time.
        ae.add_supported_context(CT_IMAGE_STORAGE, accepted_transfer_syntaxes())
        ae.add_supported_context(Verification)
        ae.require_called_aet = not self.any_called_ae
        if self.allow_ae:
            ae.require_calling_aet = self.allow_ae
        ae.maximum_associations = self.limits.max_associations
        ae.acse_timeout = self.limits.acse_timeout  # also ARTIM: a silent socket is dropped after this
        ae.dimse_timeout = self.limits.dimse_timeout
        ae.network_timeout = self.limits.network_timeout
        return ae


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes always; compressed ones where pydicom has a working decoder."""
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    out: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                      ExplicitVRBigEndian]
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return out
    for uid in (RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                JPEG2000Lossless, JPEG2000):
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except Exception:
            continue
    return out
