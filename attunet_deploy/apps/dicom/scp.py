"""The Storage SCP's handlers: plain functions over an explicit :class:`ScpContext` (as pynetdicom's
own ``storescp``), each C-STORE checked (UIDs, pixel data, size, disk) and on disk before Success
is returned; failure statuses otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attunet_deploy import limits as _limits
from attunet_deploy.apps.dicom.checks import is_valid_uid, pixel_problem, uid_problem
from attunet_deploy.apps.dicom.config import NodeConfig, NodeLimits, NodeLog
from attunet_deploy.apps.dicom.monitor import NodeMetrics
from attunet_deploy.apps.dicom.spool import Spool
from attunet_deploy.fileio import fsync_dir
from attunet_deploy.io.dicom import CT_IMAGE_STORAGE, Instance, header_of
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


@dataclass
class ScpContext:
    """What the handlers work on: the spool instances go to, the limits they are checked against,
    the log and counters, and the bytes received on each association since its last C-STORE."""

    spool: Spool
    limits: NodeLimits
    log: NodeLog
    metrics: NodeMetrics
    #: the node's settings, for saying why an association was refused (None: reasons not derived)
    config: NodeConfig | None = None
    received_bytes: weakref.WeakKeyDictionary[Any, int] = field(default_factory=weakref.WeakKeyDictionary)
    #: per association: (series, SOP class) -> [modality, count] of instances answered Success and not kept
    ignored: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], list[Any]]] = field(
        default_factory=weakref.WeakKeyDictionary)

    @property
    def out(self) -> Path:
        return self.spool.out


# ------------------------------------------------------------------ handlers (pynetdicom events)
def handle_store(event: Any, ctx: ScpContext) -> int:
    """EVT_C_STORE: check the instance and put it in the spool; the status to answer."""
    calling = str(getattr(event.assoc.requestor, "ae_title", "?")).strip()
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    ctx.received_bytes[event.assoc] = 0
    try:
        if str(event.request.AffectedSOPClassUID) != CT_IMAGE_STORAGE:
            return ignore(event, ctx)
        inst, target = store(event, ctx)
    except Refused as exc:
        code = f"0x{exc.status:04X}"
        ctx.metrics.count("refused", status=code)
        ctx.log("refused", str(exc), sop_instance=sop_uid[:80], calling_ae=calling, status=code)
        return exc.status
    except Exception as exc:  # a bug must cost one instance a failure status, never the node
        ctx.metrics.count("refused", status="0xC000")
        ctx.log("refused", f"unexpected {type(exc).__name__}: {str(exc)[:160]}", sop_instance=sop_uid[:80],
                calling_ae=calling, status="0xC000")
        return CANNOT_UNDERSTAND
    ctx.metrics.count("received")
    ctx.log("received", f"CT instance {inst.instance_number or '?'} of series {inst.series_uid}",
            sop_instance=sop_uid, calling_ae=calling, path=str(target))
    return SUCCESS


def ignore(event: Any, ctx: ScpContext) -> int:
    """An instance of a study that is not CT Image Storage (dose report, MR, secondary capture, ...),
    negotiated so that a whole-study push succeeds: answered Success, not kept, tallied for one
    ``ignored`` event per series when the association ends."""
    import pydicom

    src = Path(event.dataset_path)
    sop_class = str(event.request.AffectedSOPClassUID)
    series, modality = "?", "?"
    try:
        ds = pydicom.dcmread(str(src), stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        series = str(getattr(ds, "SeriesInstanceUID", "?"))[:64]
        modality = str(getattr(ds, "Modality", "?"))[:16]
    except Exception:  # what cannot be read is still not ours to keep
        pass
    finally:
        with contextlib.suppress(OSError):
            src.unlink()
    tally = ctx.ignored.setdefault(event.assoc, {})
    tally.setdefault((series, sop_class), [modality, 0])[1] += 1
    ctx.metrics.count("ignored", sop_class=sop_class_name(sop_class))
    return SUCCESS


def sop_class_name(uid: str) -> str:
    """A SOP class's keyword (bounded label values for /metrics), ``other`` when unknown."""
    from pydicom.uid import UID

    return UID(uid).keyword or "other" if is_valid_uid(uid) else "other"


def store(event: Any, ctx: ScpContext) -> tuple[Instance, Path]:
    """Check one C-STORE and write its instance into incoming/; Refused(status) otherwise."""
    import pydicom

    from attunet_deploy.io.dicom import has_pixel_data

    sop_class = str(event.request.AffectedSOPClassUID)
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    src = Path(event.dataset_path)  # streamed to tmp/ by pynetdicom (STORE_RECV_CHUNKED_DATASET)
    size = src.stat().st_size
    limits = ctx.limits
    if size > limits.max_instance_mb * 2**20:
        raise Refused(OUT_OF_RESOURCES, f"instance of {size / 2**20:,.1f} MB is above --max-instance-mb "
                                        f"{limits.max_instance_mb:g}")
    free = shutil.disk_usage(ctx.out).free
    if free < limits.min_free_mb * 2**20 + size:
        raise Refused(OUT_OF_RESOURCES, f"{free / 2**20:,.0f} MB free under {ctx.out}, below --min-free-mb "
                                        f"{limits.min_free_mb:g}")
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
    with ctx.spool.writing(inst.series_uid) as folder:
        try:
            target = folder / f"{sop_uid}.dcm"
            folder.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(src, 0o644)
            os.replace(src, target)  # a resend of the same SOP instance replaces it
            fsync_dir(folder)
        except OSError as exc:
            raise Refused(OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror or exc}") from None
    return inst, target


def handle_data(event: Any, ctx: ScpContext) -> None:
    """EVT_DATA_RECV: bound an instance while it streams in. Past STREAM_CEILING x --max-instance-mb,
    or when the disk under --out falls below half of --min-free-mb, the association is aborted.
    Between the limit and the ceiling the instance is received (on disk, not in memory) and refused
    with 0xA700, so the sender is told why."""
    before = ctx.received_bytes.get(event.assoc, 0)
    n = before + len(event.data)
    ctx.received_bytes[event.assoc] = n
    if before >> 24 == n >> 24:  # checked once per 16 MiB received
        return
    limits = ctx.limits
    why = None
    if n > STREAM_CEILING * limits.max_instance_mb * 2**20:
        why = f"more than {STREAM_CEILING} x --max-instance-mb {limits.max_instance_mb:g} for one instance"
    elif shutil.disk_usage(ctx.out).free < limits.min_free_mb * 2**19:
        why = f"the disk under {ctx.out} fell below half of --min-free-mb {limits.min_free_mb:g}"
    if why:
        ctx.log("aborted", f"association aborted: {why}", calling_ae=str(event.assoc.requestor.ae_title).strip())
        ctx.metrics.count("refused", status="abort")
        event.assoc.abort()


def handle_closed(event: Any, ctx: ScpContext) -> None:
    """EVT_CONN_CLOSE: one ``ignored`` event per series of instances answered and not kept; and an
    association that ended mid-instance (aborted, dropped) leaves pynetdicom's partial file in tmp/:
    it was never acknowledged, so it goes."""
    calling = str(getattr(event.assoc.requestor, "ae_title", "?")).strip()
    for (series, sop_class), (modality, n) in sorted(ctx.ignored.pop(event.assoc, {}).items()):
        ctx.log("ignored", f"{n} {sop_class_name(sop_class)} instance(s) of series {series} ({modality}) answered "
                "Success and not kept: only CT Image Storage is segmented", series=series, sop_class=sop_class,
                modality=modality, instances=n, calling_ae=calling)
    message = getattr(getattr(event.assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        with contextlib.suppress(OSError):
            partial.close()
            os.unlink(partial.name)


def _peer(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(getattr(requestor, "ae_title", "?")).strip(), str(getattr(requestor, "address", "?"))


def _why_rejected(event: Any, ctx: ScpContext) -> str:
    """What the sender was told, in words: pynetdicom's EVT_REJECTED carries no reason, so the node's
    own rules are asked in the order its ACSE applies them."""
    c = ctx.config
    if c is None:
        return "refused at negotiation"
    from attunet_deploy.apps.dicom.access import same_ae

    primitive = getattr(event.assoc.requestor, "primitive", None)
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    calling, _ = _peer(event)
    if not c.any_called_ae and called and not same_ae(called, c.ae_title):
        return f"called AE title {called[:16]!r} is not this node's {c.ae_title!r} (--any-called-ae accepts any)"
    if c.allow_ae and not any(same_ae(calling, a) for a in c.allow_ae):
        return f"calling AE title {calling[:16]!r} is not in --allow-ae"
    return f"{c.limits.max_associations} associations are open already (--max-associations)"


def handle_rejected(event: Any, ctx: ScpContext) -> None:
    """EVT_REJECTED: an association refused at negotiation, with the reason the sender was given."""
    calling, address = _peer(event)
    ctx.log("rejected", f"association refused: {_why_rejected(event, ctx)}", calling_ae=calling, address=address)


def handle_accepted(event: Any, ctx: ScpContext) -> None:
    """EVT_ACCEPTED: who, from where, which presentation contexts were accepted, and which proposed
    ones were refused (a study's MR series under --accept-sop-classes ct: nothing of it will arrive)."""
    calling, address = _peer(event)
    assoc = event.assoc
    accepted = sorted({sop_class_name(str(cx.abstract_syntax)) for cx in assoc.accepted_contexts})
    refused = sorted({sop_class_name(str(cx.abstract_syntax)) for cx in assoc.rejected_contexts})
    message = f"association from {calling} at {address}: {len(accepted)} SOP class(es) accepted"
    if refused:
        # senders such as DCMTK's storescu propose every class they know: images first, the count, the rest
        # in the field (nothing of a refused class will arrive on this association)
        shown = sorted(refused, key=lambda n: ("Image" not in n, n))[:5]
        message += (f"; {len(refused)} refused at negotiation (not negotiated by this node, see "
                    f"--accept-sop-classes), e.g. {', '.join(shown)}")
    ctx.log("association", message, calling_ae=calling, address=address, accepted=",".join(accepted)[:2000],
            refused_contexts=",".join(refused)[:4000] or None)


def handle_released(event: Any, ctx: ScpContext) -> None:
    calling, address = _peer(event)
    ctx.log("released", f"association from {calling} released", calling_ae=calling, address=address)


def handle_aborted(event: Any, ctx: ScpContext) -> None:
    calling, address = _peer(event)
    ctx.log("aborted", f"association from {calling} aborted", calling_ae=calling, address=address)


def handle_echo(event: Any, ctx: ScpContext) -> int:
    """EVT_C_ECHO: served (Success), and logged so an operator sees a scanner's connectivity test."""
    calling, address = _peer(event)
    ctx.log("echo", f"C-ECHO from {calling} answered", calling_ae=calling, address=address)
    return SUCCESS


def handlers(ctx: ScpContext) -> list[tuple[Any, Any, list[Any]]]:
    """The node's pynetdicom event handlers, each called with ``ctx``."""
    from pynetdicom import evt

    return [(evt.EVT_C_STORE, handle_store, [ctx]), (evt.EVT_REJECTED, handle_rejected, [ctx]),
            (evt.EVT_DATA_RECV, handle_data, [ctx]), (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
            (evt.EVT_ACCEPTED, handle_accepted, [ctx]), (evt.EVT_RELEASED, handle_released, [ctx]),
            (evt.EVT_ABORTED, handle_aborted, [ctx]), (evt.EVT_C_ECHO, handle_echo, [ctx])]


def make_ae(config: NodeConfig) -> Any:
    """The node's AE: what it negotiates, who it accepts, its association limits and timeouts."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time

    from attunet_deploy.apps.dicom.config import parse_sop_classes
    from attunet_deploy.apps.dicom.pdu import PDATA_MAX, node_ae_class

    limits = config.limits
    ae = node_ae_class()(ae_title=config.ae_title)
    ae.maximum_pdu_size = PDATA_MAX
    # CT Image Storage in the transfer syntaxes the node can decode, and Verification; beside them
    # (--accept-sop-classes, default all) every other storage SOP class in any transfer syntax, so that
    # a sender's whole-study push succeeds: those instances are answered Success and not kept (ignore()).
    ae.add_supported_context(CT_IMAGE_STORAGE, accepted_transfer_syntaxes())
    ae.add_supported_context(Verification)
    others = parse_sop_classes(config.accept_sop_classes)
    if others is None:
        others = tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
    for uid in others:
        if uid != CT_IMAGE_STORAGE:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.require_called_aet = not config.any_called_ae
    if config.allow_ae:
        ae.require_calling_aet = list(config.allow_ae)
    ae.maximum_associations = limits.max_associations
    ae.acse_timeout = limits.acse_timeout  # also ARTIM: a silent socket is dropped after this
    ae.dimse_timeout = limits.dimse_timeout
    ae.network_timeout = limits.network_timeout
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
