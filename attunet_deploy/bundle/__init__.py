"""The deployment bundle: a directory with ``manifest.json`` and the artifacts it lists.

Numpy-free and torch-free so that a device with only onnxruntime/tensorrt can read it.

What this package guarantees (docs/design.md, section 5a):

- **Nothing outside the bundle.** Artifact names are plain relative names (``model.onnx``,
  ``engines/x.engine``): no ``..``, no absolute paths, no hidden or odd characters; every
  artifact must be a regular file reached without symbolic links. The manifest is validated
  field by field on load (``schema``), so a damaged or hostile manifest is a one-line ``BundleError``.
- **Transactions** (``txn``). Writers never touch the live files while they work: a
  :class:`Transaction` stages new files under ``.attdeploy/txn-*`` inside the bundle and commits
  them together with the manifest at the very end. The commit writes a journal first; a commit
  cut short (even by ``kill -9``) is rolled forward by the next command, and an uncommitted one
  leaves the bundle byte-identical.
- **One writer at a time.** Writers hold an advisory lock (``.attdeploy/lock``); a second one
  gets exit 2 "bundle is busy". Readers take a shared lock on the bundle directory while
  they read the manifest and artifacts, and a commit takes it exclusively, so a reader sees
  the old bundle or the new one, never a mix.
- **Bounded reads** (``store``). Manifest size and nesting depth are limited; artifacts are
  hashed only when they are regular files of the recorded size.
- **Export targets** (``target``): export overwrites nothing it did not make.
"""

from __future__ import annotations

from attunet_deploy.bundle.schema import (
    ENGINE_DIR,
    FORMAT_NAME,
    GOLDEN_FILE,
    INTERNAL_DIR,
    MANIFEST,
    ONNX_FILES,
    OV_INT8_BIN,
    OV_INT8_XML,
    PRECISIONS,
    REPORT_FILES,
    SCHEMA_VERSION,
    SELFCHECK_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    ArtifactKind,
    check_artifact_name,
    is_bundle_dir,
    now_iso,
    validate_manifest,
)
from attunet_deploy.bundle.store import Bundle
from attunet_deploy.bundle.target import check_export_target, open_export_target
from attunet_deploy.bundle.txn import Transaction, WriterLock

__all__ = [
    "ENGINE_DIR",
    "FORMAT_NAME",
    "GOLDEN_FILE",
    "INTERNAL_DIR",
    "MANIFEST",
    "ONNX_FILES",
    "OV_INT8_BIN",
    "OV_INT8_XML",
    "PRECISIONS",
    "REPORT_FILES",
    "SCHEMA_VERSION",
    "SELFCHECK_FILE",
    "TORCHSCRIPT_FILE",
    "WEIGHTS_FILE",
    "ArtifactKind",
    "Bundle",
    "Transaction",
    "WriterLock",
    "check_artifact_name",
    "check_export_target",
    "is_bundle_dir",
    "now_iso",
    "open_export_target",
    "validate_manifest",
]
