"""Recording a passing verification in the bundle's manifest (``verify`` on the golden set): the
one bundle write the verify command makes, in a transaction of its own."""

from __future__ import annotations

from collections.abc import Sequence

from attunet_deploy.bundle import Bundle
from attunet_deploy.errors import BundleError
from attunet_deploy.judge.results import VerifyRow


def record_verification(bundle: Bundle, rows: Sequence[VerifyRow]) -> str | None:
    """Record ``rows`` in the manifest; returns why not (a busy or read-only bundle), else None."""
    try:
        with bundle.transaction() as txn:
            txn.record_verification(rows)
            txn.commit()
    except BundleError as exc:
        return str(exc)
    return None
