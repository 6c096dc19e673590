"""Results forwarded by DICOMweb STOW-RS (``serve-dicom --forward-stow URL``) with ``dicomweb-client``.

Credentials come from the environment or a file (``--forward-stow-auth env:NAME|file:PATH``), read
at each send so a rotated token is picked up, and never appear on the command line or in the log:
``USER:PASSWORD`` is basic authentication, anything else a bearer token (a leading ``Bearer `` is
allowed). https is verified (the system's CAs, or ``--forward-stow-ca``); there is no switch to turn
verification off.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from attunet_deploy.apps.dicom.config import StowTarget
from attunet_deploy.errors import InputError

#: A secret larger than this is not a credential (and is not read whole).
SECRET_MAX_BYTES = 16384
STOW_TIMEOUT_S = 60.0


def authorization(source: str | None) -> str | None:
    """The Authorization header value from ``env:NAME`` or ``file:PATH`` (None without a source)."""
    if source is None:
        return None
    kind, _, where = source.partition(":")
    if kind == "env":
        secret = os.environ.get(where)
        if secret is None:
            raise InputError(f"--forward-stow-auth env:{where}: the variable is not set", field="forward_stow_auth")
    else:
        with open(where, "rb") as fh:
            raw = fh.read(SECRET_MAX_BYTES + 1)
        if len(raw) > SECRET_MAX_BYTES:
            raise InputError(f"--forward-stow-auth file {where}: larger than {SECRET_MAX_BYTES} bytes, not a "
                             "credential", field="forward_stow_auth")
        secret = raw.decode("utf-8", errors="strict")
    secret = secret.strip()
    if not secret or any(ord(c) < 32 for c in secret):
        raise InputError("--forward-stow-auth: the credential is empty or holds control characters",
                         field="forward_stow_auth")
    if secret.lower().startswith("bearer "):
        return "Bearer " + secret[7:].strip()
    if ":" in secret:
        return "Basic " + base64.b64encode(secret.encode("utf-8")).decode("ascii")
    return "Bearer " + secret


class StowSender:
    """STOW-RS of one file per request to ``target.url``/studies; accepted when the service answers
    2xx and lists no failed SOP instance."""

    def __init__(self, target: StowTarget) -> None:
        self.target = target
        authorization(target.auth)  # a missing variable or unreadable file fails at start, not per file

    def __str__(self) -> str:
        return f"STOW-RS {self.target.url}"

    def _client(self) -> Any:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.verify = self.target.ca or True
        auth = authorization(self.target.auth)
        if auth:
            session.headers["Authorization"] = auth
        client = DICOMwebClient(url=self.target.url.rstrip("/"), session=session, timeout=STOW_TIMEOUT_S)
        client.set_http_retry_params(retry=False)  # the outbox retries, with its back-off, and keeps the file
        return client

    def send(self, path: Path) -> tuple[bool, str]:
        import pydicom
        import requests

        ds = pydicom.dcmread(str(path))
        try:
            response = self._client().store_instances([ds])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            return False, f"HTTP {code}"
        except requests.RequestException as exc:
            return False, f"{type(exc).__name__}: {str(exc)[:120]}"
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            return False, f"the service refused it (FailureReason {reason})"
        return True, ""
