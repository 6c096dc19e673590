"""PDU-level limits pynetdicom does not apply by itself.

pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) and then ``recv(length)``, and its
socket's ``recv`` loops until that many bytes came: a header claiming 0xFFFFFFF0 bytes makes it hold
whatever follows in memory, and a peer that stops mid-PDU holds its thread (and an association
slot) for good, since no timeout applies inside a PDU. ``BoundedSocket`` is the smallest change
that fixes both from outside: the same ``AssociationSocket`` with a ``recv`` that

- refuses a body longer than the node advertises (P-DATA-TF: the maximum PDU length it offers in
  its A-ASSOCIATE-AC; every other PDU: ``OTHER_PDU_MAX``) before reading any of it, and
- gives each PDU read a deadline (``--acse-timeout`` before the association is established,
  ``--network-timeout`` after), however the bytes trickle in.

Either raises ``ConnectionAbortedError``, which the DUL takes as the transport closing (Evt17):
the association ends, its thread and slot are freed. The request handler swaps its freshly made
socket's class to ``BoundedSocket`` (which adds no state of its own beyond ``limits``).

``NodeAE`` counts only *established* acceptor associations against ``--max-associations``: a
connection that has not finished negotiating (at most ``--acse-timeout`` long now) no longer
locks out a scanner's C-ECHO or C-STORE. Pending connections are bounded separately
(``PENDING_FACTOR`` x ``--max-associations``) by the server's ``verify_request``.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The largest P-DATA-TF PDU the node receives (its A-ASSOCIATE-AC's Maximum Length Received): 256 KiB
#: carries a 512x512 slice in 2 PDUs (pynetdicom's default 16 KiB needs 32) and bounds each read.
PDATA_MAX = 256 * 1024
#: Every other PDU (A-ASSOCIATE-RQ with 128 presentation contexts of many transfer syntaxes is the
#: largest a real peer sends: tens of KiB).
OTHER_PDU_MAX = 1024 * 1024
#: Connections still negotiating, as a multiple of --max-associations, before new ones are dropped.
PENDING_FACTOR = 4
_PDATA_TF = 0x04


@dataclass(frozen=True)
class PduLimits:
    """What one association's socket enforces, and where it says so."""

    pdata_max: int
    acse_timeout: float
    network_timeout: float
    log: Callable[..., Any]


def bounded_socket_class() -> type:
    """``BoundedSocket``: pynetdicom's AssociationSocket with a bounded ``recv`` (module docstring)."""
    from pynetdicom.transport import AssociationSocket

    class BoundedSocket(AssociationSocket):  # type: ignore[misc, valid-type]
        limits: PduLimits
        born: float  # when the connection was accepted
        _pdu_type = -1

        def recv(self, nr_bytes: int) -> bytearray:
            limits = self.limits
            established = bool(getattr(self.assoc, "is_established", False))
            header = nr_bytes == 6 and self._pdu_type < 0
            if not header:
                cap = limits.pdata_max if self._pdu_type == _PDATA_TF else OTHER_PDU_MAX
                kind, self._pdu_type = self._pdu_type, -1
                if nr_bytes > cap:
                    self._refuse(f"PDU type 0x{kind:02X} of {nr_bytes:,} bytes is above the {cap:,} this node "
                                 "accepts")
            if established:
                budget = limits.network_timeout
                deadline = time.monotonic() + budget
            else:  # the whole negotiation, from the connection's acceptance: a late-started thread gets no extra time
                budget = min(limits.acse_timeout, limits.network_timeout)
                deadline = getattr(self, "born", time.monotonic()) + budget
            data = self._read(nr_bytes, deadline, budget)
            if header and len(data) == 6:
                self._pdu_type = struct.unpack(">BBL", bytes(data))[0]
            return data

        def _read(self, nr_bytes: int, deadline: float, budget: float) -> bytearray:
            sock = self.socket
            out = bytearray()
            if sock is None:
                return out
            try:
                while len(out) < nr_bytes:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._refuse(f"a PDU stalled: {len(out):,} of {nr_bytes:,} bytes in {budget:g} s")
                    sock.settimeout(left)
                    try:
                        chunk = sock.recv(min(65536, nr_bytes - len(out)))
                    except TimeoutError:
                        self._refuse(f"a PDU stalled: {len(out):,} of {nr_bytes:,} bytes in {budget:g} s")
                    if not chunk:
                        return out  # the peer closed: what pynetdicom's own recv returns
                    out.extend(chunk)
            finally:
                if self.socket is not None:
                    self.socket.settimeout(None)
            return out

        def _refuse(self, why: str) -> None:
            address = getattr(getattr(self.assoc, "requestor", None), "address", "?")
            self.limits.log("aborted", f"association aborted: {why}", address=str(address))
            raise ConnectionAbortedError(why)

    return BoundedSocket


def request_handler_class(limits: PduLimits) -> type:
    """pynetdicom's RequestHandler whose associations read through ``BoundedSocket``."""
    from pynetdicom.transport import RequestHandler

    bounded = bounded_socket_class()

    class BoundedRequestHandler(RequestHandler):  # type: ignore[misc, valid-type]
        def _create_association(self) -> Any:
            assoc = super()._create_association()
            sock: Any = assoc.dul.socket
            sock.__class__ = bounded  # same object and state, a bounded recv (see the module docstring)
            sock.limits = limits
            sock.born = time.monotonic()
            return assoc

    return BoundedRequestHandler


def node_ae_class() -> type:
    """pynetdicom's AE, counting only established acceptor associations (and the one negotiating
    now) against ``maximum_associations``."""
    from pynetdicom import AE

    class NodeAE(AE):  # type: ignore[misc, valid-type]
        @property
        def active_associations(self) -> list[Any]:
            me = threading.current_thread()
            return [a for a in super().active_associations
                    if a is me or not a.is_acceptor or a.is_established or a.is_released or a.is_aborted]

        def pending_connections(self) -> int:
            """Acceptor associations still negotiating."""
            from pynetdicom.association import Association

            return sum(1 for t in threading.enumerate()
                       if isinstance(t, Association) and t.ae is self and t.is_acceptor and not t.is_established)

    return NodeAE
