"""The node's shared state and settings: resource limits, the event log, and the attributes
every role (SCP handlers, spool, worker, forwarder) reads.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import queue
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attunet_deploy.apps.dicom.monitor import NodeMetrics
from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import InputError

if TYPE_CHECKING:  # the forwarder imports this module
    from attunet_deploy.apps.dicom.forwarder import ForwardTarget


@dataclass
class NodeLimits:
    """Resource bounds of the node (every one a CLI option; README "At the scanner")."""

    max_instance_mb: float = 64.0
    min_free_mb: float = 1024.0
    keep_archive_days: float | None = 7.0  # None: delete a series' instances once its SEG is written
    max_associations: int = 32
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0

    def check(self) -> NodeLimits:
        for name in ("max_instance_mb", "min_free_mb", "acse_timeout", "dimse_timeout", "network_timeout"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0 or (v == 0 and name != "min_free_mb"):
                raise InputError(f"--{name.replace('_', '-')} {v:g}: must be a positive number")
        if self.keep_archive_days is not None and not (math.isfinite(self.keep_archive_days)
                                                       and self.keep_archive_days > 0):
            raise InputError(f"--keep-archive {self.keep_archive_days:g}: use 'none' or a number of days > 0")
        if not 1 <= self.max_associations <= 1024:
            raise InputError(f"--max-associations {self.max_associations}: must be in 1..1024")
        return self


def parse_keep(text: str) -> float | None:
    """``--keep-archive``: ``none`` or a number of days."""
    if text.strip().lower() == "none":
        return None
    try:
        days = float(text)
    except ValueError:
        raise InputError(f"--keep-archive {text!r}: use 'none' or a number of days, e.g. 7") from None
    if not math.isfinite(days) or days <= 0:
        raise InputError(f"--keep-archive {text!r}: use 'none' or a number of days > 0")
    return days


def check_ae_title(title: str, what: str = "--ae-title") -> str:
    if not 1 <= len(title) <= 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in title) or not title.strip():
        raise InputError(f"{what} {title!r}: an AE title is 1-16 printable ASCII characters")
    return title.strip(" ")


class NodeLog:
    """One line per event on stderr: plain text, or JSON objects with --log-json."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json = as_json
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def __call__(self, event: str, message: str, **fields: Any) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        if self.as_json:
            line = json.dumps({"time": now, "event": event, "message": message, **fields}, default=str)
        else:
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            line = f"{now} {event}: {message}" + (f" ({extra})" if extra else "")
        with self.lock:
            print(line, file=self.stream, flush=True)


class NodeState:
    """What every role of the node shares (set by :class:`~attunet_deploy.apps.dicom.node.DicomNode`)."""

    bundle: Bundle
    out: Path
    dirs: dict[str, Path]
    limits: NodeLimits
    log: NodeLog
    metrics: NodeMetrics
    stop: threading.Event
    lock: threading.Lock
    quiet: float
    ae_title: str
    any_called_ae: bool
    allow_ae: list[str]
    forward: ForwardTarget | None
    precision: str
    segment_label: str
    #: associations writing each series right now, and when each series last received an instance
    writers: dict[str, int]
    last_seen: dict[str, float]
    jobs: queue.Queue[Path]
    queued: set[str]
    #: masks segmented while a series was still arriving (2D model: slices are independent)
    masks: dict[tuple[str, int, int], Any]
    mask_bytes: int
    #: bytes received on each association since its last C-STORE (bounds a streamed instance)
    received_bytes: weakref.WeakKeyDictionary[Any, int]
