"""Export's output folder: classify ``-o`` (new, one of our bundles, a foreign folder with
``--force``) and begin export's transaction there, overwriting nothing we did not make.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attunet_deploy.bundle.schema import (
    INTERNAL_DIR,
    MANIFEST,
    REPORT_FILES,
    Manifest,
    check_artifact_name,
    is_bundle_dir,
    read_manifest,
    validate_manifest,
)
from attunet_deploy.bundle.store import Bundle
from attunet_deploy.bundle.txn import Transaction, remove_if_only_internal
from attunet_deploy.errors import BundleError, InputError


# ====================================================================================== export target
def check_export_target(out: str | os.PathLike[str], force: bool, writes: list[str]) -> tuple[Path, str]:
    """Resolve and classify export's ``-o`` without changing anything: (bundle root, mode).

    Mode is 'new' (missing or empty), 'replace' (one of our bundles) or 'into' (a foreign
    folder, only with ``force``, and only if none of ``writes`` exists there: we never
    overwrite what we did not make).
    """
    raw = Path(out)
    if str(out).strip() == "":
        raise InputError("-o needs a directory name")
    root = raw.resolve()  # '-o .' and '-o link-to-bundle' both mean the real folder
    if root.exists() and not root.is_dir():
        raise BundleError(f"{raw} exists and is not a directory: choose another -o")
    if not root.exists():
        return root, "new"
    try:
        entries = [e.name for e in root.iterdir() if e.name != INTERNAL_DIR]
    except OSError as exc:
        raise BundleError(f"cannot read {raw}: {exc.strerror or exc}") from None
    if not entries:
        return root, "new"
    if is_bundle_dir(root):
        return root, "replace"
    if not force:
        raise BundleError(f"{raw} is not empty and not a bundle (no attunet-deploy manifest): choose another -o, or "
                          "pass --force to add the bundle's files to it (nothing of yours is overwritten)")
    clash = [n for n in [MANIFEST, *writes, *REPORT_FILES] if os.path.lexists(root / n)]
    if clash:
        raise BundleError(f"{raw / clash[0]} exists and was not made by attdeploy: --force writes only "
                          "into folders where it overwrites nothing; move it away or choose another -o")
    return root, "into"


def open_export_target(out: str | os.PathLike[str], force: bool, writes: list[str]) -> tuple[Path, str, Transaction]:
    """:func:`check_export_target`, then begin export's transaction on that folder (created if
    missing, and removed again if the export does not commit)."""
    root, mode = check_export_target(out, force, writes)
    created = False
    if not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise BundleError(f"cannot create {out}: {exc.strerror or exc}") from None
        created = True
    old_manifest: Manifest = {"artifacts": {}}
    if mode == "replace":
        try:
            old_manifest = validate_manifest(read_manifest(root), root / MANIFEST)
        except BundleError:
            old_manifest = {"artifacts": {}}  # ours but damaged: replace what we can name
    try:
        txn = Transaction(root, {"artifacts": {}}, bundle_type=Bundle, created_root=created)
    except BaseException:
        if created:
            remove_if_only_internal(root)
        raise
    txn.old_artifacts = {n for n in old_manifest.get("artifacts", {}) if _safe_name(n)}
    if mode == "replace":
        txn.deletes.update(txn.old_artifacts)  # superseded unless the new export writes it again
        txn.deletes.update(REPORT_FILES)
        clash = [n for n in writes if os.path.lexists(root / n) and n not in txn.old_artifacts]
        if clash:
            txn.abort()
            raise BundleError(f"{root / clash[0]} is in the bundle folder but not listed in its manifest: move it "
                              "away first (attdeploy replaces only files it made)")
    return root, mode, txn


def _safe_name(name: Any) -> bool:
    try:
        check_artifact_name(name)
    except BundleError:
        return False
    return True
