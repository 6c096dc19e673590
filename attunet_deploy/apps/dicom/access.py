"""Who may talk to the DICOM node, and how: host filter, TLS (PS3.15 Annex B), AE title rules.

pynetdicom's stock server wraps an accepted socket in TLS *inside its accept loop*, so one client
that connects and never finishes the handshake would stall every later connection. The server
here does the handshake in the connection's own thread, under a timeout.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

from attunet_deploy.apps.dicom.pdu import PduLimits
from attunet_deploy.errors import InputError


def same_ae(a: str, b: str) -> bool:
    """AE titles compare as DICOM does: leading and trailing spaces are not significant (PS3.5
    Table 6.2-1, AE); everything else, case included, is."""
    return a.strip(" ") == b.strip(" ")


def parse_hosts(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``--allow-host`` values: addresses or networks (10.0.0.5, 10.0.0.0/24, ::1)."""
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise InputError(f"--allow-host {v!r}: use an IP address or a network such as 10.0.0.0/24") from None
    return nets


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """A server context for DICOM TLS (BCP 195: TLS 1.2 or newer); with ``ca`` the peer must
    present a certificate signed by it."""
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise InputError("TLS needs both --tls-cert and --tls-key (and optionally --tls-ca to require client "
                         "certificates)")
    for what, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if path and not Path(path).is_file():
            raise InputError(f"{what} {path}: not a readable file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise InputError(f"cannot load the TLS certificate/key: {exc}") from None
    return ctx


class SharedContexts(list):  # type: ignore[type-arg]
    """The node's supported presentation contexts, shared read-only by every association."""

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


def server_class(allow_hosts: list[Any], handshake_timeout: float, log: Any, pdu: PduLimits | None = None,
                 max_pending: int = 0) -> type:
    """A pynetdicom ThreadedAssociationServer that filters hosts, handshakes TLS per thread, reads
    PDUs within ``pdu``'s limits (apps/dicom/pdu.py) and drops connections beyond ``max_pending``
    still negotiating."""
    from pynetdicom.transport import ThreadedAssociationServer

    from attunet_deploy.apps.dicom.pdu import request_handler_class

    class NodeServer(ThreadedAssociationServer):  # type: ignore[misc, valid-type]
        # socketserver's default listen backlog is 5: a burst of connections (a scanner opening several
        # associations, or hostile half-open ones) would wait for SYN retries of a second or more.
        request_queue_size = max(128, max_pending)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if pdu is not None:
                kwargs["request_handler"] = request_handler_class(pdu)
            super().__init__(*args, **kwargs)
            # pynetdicom deep-copies the supported contexts for every association: with every storage SOP
            # class in 45 transfer syntaxes that is ~0.2 s of CPU and ~1.3 MB per connection. Negotiation
            # only reads them (presentation.negotiate_as_acceptor builds new result contexts), so one
            # list is shared.
            self.contexts = SharedContexts(self.contexts)

        def get_request(self) -> tuple[socket.socket, Any]:
            assert self.socket is not None  # get_request runs only on a bound, listening server
            client, address = self.socket.accept()
            if self.ssl_context:
                client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            return client, address

        def verify_request(self, request: Any, client_address: Any) -> bool:
            pending = getattr(self.ae, "pending_connections", None)
            if max_pending and pending is not None and pending() >= max_pending:
                log("rejected", f"{max_pending} connections are still negotiating: connection dropped",
                    address=str(client_address[0]))
                return False
            if not allow_hosts:
                return True
            try:
                ip = ipaddress.ip_address(str(client_address[0]).split("%")[0])
            except ValueError:
                return False
            ok = any(ip in net for net in allow_hosts)
            if not ok:
                log("rejected", "connection from a host not in --allow-host", address=str(client_address[0]))
            return ok

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(handshake_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ssl.SSLError) as exc:
                    log("rejected", f"TLS handshake failed: {str(exc)[:120]}", address=str(client_address[0]))
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)

        def handle_error(self, request: Any, client_address: Any) -> None:
            log("note", "connection ended with an error", address=str(client_address[0]))

    return NodeServer
