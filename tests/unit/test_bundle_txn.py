"""bundle/ transactions in-process: commit, abort, the writer lock, a writer that lost a race, and the
recovery of a commit cut short in each of its journal states (what ``kill -9`` leaves). No torch,
no subprocess: a bundle of small stand-in files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from attunet_deploy.bundle import INTERNAL_DIR, MANIFEST, Bundle, Transaction
from attunet_deploy.bundle.spec import InputSpec, ModelSpec, Normalization, Postprocessing
from attunet_deploy.bundle.txn import _JOURNAL, _apply, recover_if_needed
from attunet_deploy.errors import BundleError

CONFIG = {"in_channels": 1, "out_channels": 1, "base_channels": 8}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and INTERNAL_DIR not in p.parts}


def make_bundle(root: Path) -> Bundle:
    """A valid two-artifact bundle: model.onnx and golden.npz as stand-in bytes."""
    root.mkdir()
    spec = ModelSpec(InputSpec(1, 1), Normalization.parse("ct-window:40,400"), Postprocessing.default(1))
    txn = Transaction(root, Bundle.new_manifest(config=CONFIG, spec=spec, source={"path": "x"}), bundle_type=Bundle)
    with txn:
        txn.stage("model.onnx").write_bytes(b"graph v1")
        txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
        txn.stage("golden.npz").write_bytes(b"golden v1")
        txn.add_artifact("golden.npz", kind="golden")
        return txn.commit()


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_bundle(tmp_path / "b")


def test_a_commit_applies_files_and_manifest_together(bundle: Bundle) -> None:
    with bundle.transaction() as txn:
        txn.stage("model.fp16.onnx").write_bytes(b"half")
        txn.add_artifact("model.fp16.onnx", kind="onnx", precision="fp16")
        txn.stage("model.onnx").write_bytes(b"graph v2")
        txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
        assert (bundle.root / "model.onnx").read_bytes() == b"graph v1"  # nothing live changes before commit
        new = txn.commit()
    assert (bundle.root / "model.onnx").read_bytes() == b"graph v2"
    assert set(new.artifacts) == {"model.onnx", "golden.npz", "model.fp16.onnx"}
    assert Bundle.load(bundle.root).sha256("model.fp16.onnx") == new.sha256("model.fp16.onnx")  # hashes check
    assert not list((bundle.root / INTERNAL_DIR).glob("txn-*"))


def test_an_aborted_transaction_leaves_the_bundle_byte_identical(bundle: Bundle) -> None:
    before = _files(bundle.root)
    with pytest.raises(RuntimeError), bundle.transaction() as txn:
        txn.stage("model.onnx").write_bytes(b"never")
        txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
        txn.remove("golden.npz")
        raise RuntimeError("a step failed")
    assert _files(bundle.root) == before
    assert not list((bundle.root / INTERNAL_DIR).glob("txn-*"))


def test_one_writer_at_a_time_and_a_stale_writer_is_refused(bundle: Bundle) -> None:
    with bundle.transaction(), pytest.raises(BundleError, match="busy"):
        bundle.transaction()
    stale = Bundle.load(bundle.root)
    with bundle.transaction() as txn:  # another command commits first
        txn.stage("model.onnx").write_bytes(b"graph v2")
        txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
        txn.commit()
    after = _files(bundle.root)
    with pytest.raises(BundleError, match="changed by another command"):
        stale.transaction()
    assert _files(bundle.root) == after


def test_a_replaced_artifact_is_refused_on_load(bundle: Bundle) -> None:
    (bundle.root / "model.onnx").write_bytes(b"graph vX")  # same size, other bytes
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(bundle.root)


def _journalled(bundle: Bundle) -> Path:
    """A commit stopped right after its journal was written (the state kill -9 can leave)."""
    txn = bundle.transaction()
    txn.stage("model.onnx").write_bytes(b"graph v2")
    txn.add_artifact("model.onnx", kind="onnx", precision="fp32")
    txn.remove("golden.npz")
    staging = txn.staging
    txn.manifest["updated"] = "later"
    (staging / MANIFEST).write_text(json.dumps(txn.manifest))
    (staging / _JOURNAL).write_text(json.dumps({"writes": ["model.onnx"], "deletes": ["golden.npz"],
                                               "delete_dirs": []}))
    txn.lock.release()  # the process died holding nothing
    return staging


@pytest.mark.parametrize("state", ["journal only", "file moved", "file moved and deleted", "all but the manifest"])
def test_a_commit_cut_short_is_rolled_forward_from_every_journal_state(bundle: Bundle, state: str) -> None:
    staging = _journalled(bundle)
    if state != "journal only":
        os.replace(staging / "files" / "model.onnx", bundle.root / "model.onnx")
    if state in ("file moved and deleted", "all but the manifest"):
        (bundle.root / "golden.npz").unlink()
    recover_if_needed(bundle.root)  # what the next reader does
    b = Bundle.load(bundle.root)
    assert (bundle.root / "model.onnx").read_bytes() == b"graph v2" and not (bundle.root / "golden.npz").exists()
    assert set(b.artifacts) == {"model.onnx"} and not staging.exists()


def test_staging_without_a_journal_is_dropped_and_the_bundle_kept(bundle: Bundle) -> None:
    before = _files(bundle.root)
    txn = bundle.transaction()
    txn.stage("model.onnx").write_bytes(b"half written")
    staging = txn.staging
    txn.lock.release()  # killed before the journal: the commit never began
    with bundle.transaction() as again:  # the next writer clears it
        again.abort()
    assert not staging.exists() and _files(bundle.root) == before


def test_applying_a_journal_twice_changes_nothing_more(bundle: Bundle) -> None:
    staging = _journalled(bundle)
    (staging / "keep").mkdir()  # _apply removes the whole staging folder at its end; a copy replays it
    journal = (staging / _JOURNAL).read_text()
    manifest = (staging / MANIFEST).read_text()
    _apply(bundle.root, staging)
    first = _files(bundle.root)
    staging.mkdir(parents=True)
    (staging / _JOURNAL).write_text(journal)
    (staging / MANIFEST).write_text(manifest)
    _apply(bundle.root, staging)  # the files are gone from staging: already applied
    assert _files(bundle.root) == first


def test_the_typed_spec_is_what_the_manifest_says(bundle: Bundle) -> None:
    spec = bundle.spec
    assert spec.normalization == Normalization("ct_window", level=40.0, width=400.0)
    assert spec.input.divisors == (16, 16) and spec.input.layout == "NCHW" and spec.sliding_window is None
    assert bundle.artifacts["golden.npz"].kind == "golden" and bundle.golden.recorded is False
