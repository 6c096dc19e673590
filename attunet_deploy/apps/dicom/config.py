"""The node's settings, each checked once when it is made: :class:`NodeLimits` (resource bounds)
and :class:`NodeConfig` (everything ``serve-dicom`` is told), and the event log every part writes to.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attunet_deploy.errors import InputError


@dataclass(frozen=True)
class NodeLimits:
    """Resource bounds of the node (every one a CLI option; README "At the scanner")."""

    max_instance_mb: float = 64.0
    min_free_mb: float = 1024.0
    keep_archive_days: float | None = 7.0  # None: delete a series' instances once its SEG is written
    max_associations: int = 32
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_instance_mb", "min_free_mb", "acse_timeout", "dimse_timeout", "network_timeout"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0 or (v == 0 and name != "min_free_mb"):
                raise InputError(f"{name.replace('_', ' ')} {v:g}: must be a positive number", field=name)
        if self.keep_archive_days is not None and not (math.isfinite(self.keep_archive_days)
                                                       and self.keep_archive_days > 0):
            raise InputError(f"archive keeping {self.keep_archive_days:g} days: use none or a number of days > 0",
                             field="keep_archive")
        if not 1 <= self.max_associations <= 1024:
            raise InputError(f"max associations {self.max_associations}: must be in 1..1024", field="max_associations")


def parse_keep(text: str) -> float | None:
    """``none`` or a number of days (how long archive/ and sent/ keep their files)."""
    if text.strip().lower() == "none":
        return None
    try:
        days = float(text)
    except ValueError:
        raise InputError(f"archive keeping {text!r}: use none or a number of days, e.g. 7",
                         field="keep_archive") from None
    if not math.isfinite(days) or days <= 0:
        raise InputError(f"archive keeping {text!r}: use none or a number of days > 0", field="keep_archive")
    return days


def check_ae_title(title: str, field_name: str = "ae_title") -> str:
    if not 1 <= len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title) or not title.strip():
        raise InputError(f"AE title {title!r}: 1-16 printable ASCII characters", field=field_name)
    return title.strip(" ")


def _readable(path: str, field_name: str, what: str) -> str:
    from pathlib import Path

    if not Path(path).is_file():
        raise InputError(f"{what} {path}: not a readable file", field=field_name)
    return path


@dataclass(frozen=True)
class ForwardTls:
    """DICOM TLS for --forward: the CA that signed the PACS's certificate (None: the system's), and
    this node's own certificate and key where the PACS asks for one. The PACS's certificate must
    name the host when --forward gives a name (an address is checked against the CA only)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InputError("a client certificate needs both --forward-tls-cert and --forward-tls-key",
                             field="forward_tls_cert")
        for name, value in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            if value:
                _readable(value, f"forward_tls_{name}", f"--forward-tls-{name}")


@dataclass(frozen=True)
class StowTarget:
    """Where results go by DICOMweb STOW-RS: the service root URL (its ``/studies`` is posted to), the
    credentials' source (``env:NAME`` or ``file:PATH``: ``USER:PASSWORD`` for basic authentication,
    anything else a bearer token; never on the command line) and the CA bundle that verifies an https
    service (None: the system's; verification is always on)."""

    url: str
    auth: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"STOW-RS URL {self.url[:80]!r}: use http(s)://HOST[:PORT]/dicom-web",
                             field="forward_stow")
        if parts.username or parts.password:
            raise InputError("credentials do not go in the URL: use --forward-stow-auth env:NAME or file:PATH",
                             field="forward_stow")
        if self.auth is not None:
            kind, _, where = self.auth.partition(":")
            if kind not in ("env", "file") or not where:
                raise InputError(f"--forward-stow-auth {self.auth[:40]!r}: use env:NAME or file:PATH",
                                 field="forward_stow_auth")
            if kind == "file":
                _readable(where, "forward_stow_auth", "--forward-stow-auth file")
        if self.ca:
            _readable(self.ca, "forward_stow_ca", "--forward-stow-ca")

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ForwardTarget:
    """Where SEGs are sent on by C-STORE: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ForwardTarget:
        m = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
        if not m or not 0 < int(m.group(3)) < 65536:
            raise InputError(f"forward destination {text!r}: use AET@HOST:PORT, e.g. PACS@10.0.0.5:104",
                             field="forward")
        return cls(m.group(1), m.group(2), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


#: ``--accept-sop-classes``: ``ct`` (strict: only CT Image Storage is negotiated), ``all`` (every
#: storage SOP class: a whole-study push succeeds; what is not CT is answered Success and ignored),
#: or a comma-separated list of SOP class UIDs or keywords negotiated beside CT.
SOP_CLASS_MODES = ("ct", "all")


def parse_sop_classes(text: str) -> tuple[str, ...] | None:
    """``--accept-sop-classes`` -> the storage SOP class UIDs negotiated beside CT Image Storage
    (None: every storage SOP class; () for ``ct``)."""
    mode = text.strip().lower()
    if mode == "all":
        return None
    if mode == "ct":
        return ()
    from pydicom.uid import UID

    out = []
    for item in (t.strip() for t in text.split(",")):
        uid = _storage_uid(item)
        if uid is None:
            raise InputError(f"SOP class {item[:64]!r}: not a storage SOP class UID or keyword (e.g. MRImageStorage, "
                             "1.2.840.10008.5.1.4.1.1.4); or use ct or all", field="accept_sop_classes")
        out.append(str(UID(uid)))
    return tuple(dict.fromkeys(out))


def _storage_uid(item: str) -> str | None:
    from pynetdicom import AllStoragePresentationContexts

    if not item:
        return None

    known = {str(cx.abstract_syntax): cx for cx in AllStoragePresentationContexts}
    if item in known:
        return item
    from pydicom.uid import UID

    for uid in known:
        if UID(uid).keyword == item:
            return uid
    return None


@dataclass(frozen=True)
class NodeConfig:
    """What ``serve-dicom`` is told: who may connect and how, when a series is complete, where SEGs
    go, which backend and precision segment, and the resource limits."""

    port: int = 11112
    ae_title: str = "ATTDEPLOY"
    bind: str = "0.0.0.0"
    allow_ae: tuple[str, ...] = ()
    any_called_ae: bool = False
    allow_host: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    quiet_seconds: float = 5.0
    forward: str | None = None
    http_port: int | None = None
    log_json: bool = False
    backend: str = "auto"
    precision: str = "fp32"
    segment_label: str | None = None  # None: the bundle's name, else "Target"
    #: result kinds per series (seg, rtstruct, sc, sr) and the acceptance rules file (None: defaults)
    outputs: tuple[str, ...] = ("seg",)
    accept: str | None = None
    #: storage SOP classes negotiated beside CT (``parse_sop_classes``): ``all`` by default
    accept_sop_classes: str = "all"
    #: results go on by C-STORE (``forward``, with ``forward_tls`` for DICOM TLS) or by STOW-RS
    forward_tls: ForwardTls | None = None
    forward_stow: StowTarget | None = None
    limits: NodeLimits = field(default_factory=NodeLimits)
    runner_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InputError(f"port {self.port}: must be in 1..65535", field="port")
        if self.http_port is not None and not 0 < self.http_port < 65536:
            raise InputError(f"HTTP port {self.http_port}: must be in 1..65535", field="http_port")
        if not 0.1 <= self.quiet_seconds <= 3600:
            raise InputError(f"quiet period {self.quiet_seconds} s: must be in 0.1..3600", field="quiet_seconds")
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title))
        from attunet_deploy.dicomtext import check_dicom_text

        if self.segment_label is not None:
            object.__setattr__(self, "segment_label", check_dicom_text(self.segment_label, "segment label",
                                                                       field="segment_label"))
        object.__setattr__(self, "allow_ae", tuple(check_ae_title(a, "allow_ae") for a in self.allow_ae))
        if self.forward is not None:
            ForwardTarget.parse(self.forward)
        if self.forward is not None and self.forward_stow is not None:
            raise InputError("one destination: --forward (C-STORE) or --forward-stow (DICOMweb), not both",
                             field="forward_stow")
        if self.forward_tls is not None and self.forward is None:
            raise InputError("--forward-tls-* options secure --forward: give --forward AET@HOST:PORT too",
                             field="forward_tls_ca")
        parse_sop_classes(self.accept_sop_classes)
        from attunet_deploy.apps.dicom.outputs import parse_outputs

        object.__setattr__(self, "outputs", parse_outputs(",".join(self.outputs)))
        if self.accept is not None:
            from attunet_deploy.apps.dicom.gate import load_rules

            load_rules(self.accept)  # a bad rules file is one line at start, not a refusal per series

    @property
    def forward_target(self) -> ForwardTarget | None:
        return ForwardTarget.parse(self.forward) if self.forward else None


@dataclass(frozen=True)
class NodeEvent:
    """One thing that happened at the node: a small immutable record, written as a line (or a
    JSON object) by :class:`NodeLog` at the edge."""

    event: str
    message: str
    fields: Mapping[str, object]
    time: str

    def to_dict(self) -> dict[str, object]:
        return {"time": self.time, "event": self.event, "message": self.message, **self.fields}

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return f"{self.time} {self.event}: {self.message}" + (f" ({extra})" if extra else "")


class NodeLog:
    """One line per event on stderr: plain text, or JSON objects with --log-json."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def __call__(self, event: str, message: str, **fields: object) -> NodeEvent:
        record = NodeEvent(event, message, fields,
                           _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"))
        text = json.dumps(record.to_dict(), default=str) if self.as_json else record.line()
        with self.lock:
            print(text, file=self.stream, flush=True)
        return record
