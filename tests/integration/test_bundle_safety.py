"""Hostile and careless input against the bundle and the CLI. Every case checks the exit code, the one-line message and
that the bundle's files are byte-identical afterwards (docs/design.md section 5a).

Rules: nothing outside the bundle; only what we made is replaced; transactions; one writer at a
time; bounded reads; every option validated; outputs never collide; one line, never exit 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attunet_deploy.bundle import Bundle, WriterLock
from attunet_deploy.cli import main
from attunet_deploy.errors import BundleError, InputError

EXE = [sys.executable, "-m", "attunet_deploy.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=True, env=env)
    return result.exit_code, result.stdout, result.stderr


#: Run-time caches a reader may fill (compiled OpenVINO models, ONNX Runtime TensorRT-EP engines):
#: never listed in the manifest, never read as artifacts, safe to delete.
CACHES = ("engines/openvino/", "engines/ort-trt/")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of a bundle, except our private .attdeploy folder and run-time caches."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and ".attdeploy" not in f.relative_to(root).parts and not rel.startswith(CACHES):
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line(code: int, err: str, match: str, expect: int = 2) -> None:
    assert code == expect, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("✓", "note:", "TensorRT"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert match in lines[0], err


@pytest.fixture
def qbundle(tmp_path: Path, small_bundle: Path) -> Path:
    """A private small bundle with fp16 + int8 graphs (calibrated on random images)."""
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    dst = tmp_path / "bundle"
    shutil.copytree(small_bundle, dst)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((4, 1, 48, 48), dtype=np.float32))
    quantize_bundle(Bundle.load(dst), QuantizeSettings(calib=str(tmp_path / "calib.npy"), verify=False))
    return dst


def edit_manifest(root: Path, fn: Any) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


# ================================================================== nothing outside the bundle
def _rename_artifact(new: str, keep_bytes: bool = True) -> Any:
    def fn(m: dict[str, Any]) -> None:
        e = m["artifacts"].pop("golden.npz")
        if not keep_bytes:
            e.pop("bytes")
        m["artifacts"][new] = e
    return fn


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "/dev/zero", "engines/../../x", "a/./b",
                                  ".hidden", "engines/../manifest.json", "..\\x", "a\u0000b", "x" * 300,
                                  "manifest.json", ".attdeploy/lock", "", "a/b/c/d", "model.onnx/", " spaced"])
def test_artifact_names_outside_the_bundle_are_refused(bundle_copy: Path, name: str) -> None:
    outside = bundle_copy.parent / "outside.txt"
    outside.write_bytes((bundle_copy / "golden.npz").read_bytes())  # same sha256 as the listed artifact
    edit_manifest(bundle_copy, _rename_artifact(name))
    before = snapshot(bundle_copy)
    for cmd in (["info"], ["verify", "--backend", "ort", "--precision", "fp32"]):
        code, _, err = run(*cmd, "-b", str(bundle_copy))
        one_line(code, err, "not a plain relative name")
    assert snapshot(bundle_copy) == before


def test_dev_zero_artifact_without_size_does_not_hang(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, _rename_artifact("/dev/zero", keep_bytes=False))
    proc = subprocess.run([*EXE, "info", "-b", str(bundle_copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a plain relative name" in proc.stderr


def test_symlinked_artifact_leaving_the_bundle_is_refused(bundle_copy: Path) -> None:
    outside = bundle_copy.parent / "golden_outside.npz"
    shutil.move(bundle_copy / "golden.npz", outside)
    (bundle_copy / "golden.npz").symlink_to(outside)  # same bytes, same sha256, but outside
    code, _, err = run("verify", "-b", str(bundle_copy), "--backend", "ort", "--precision", "fp32")
    one_line(code, err, "symbolic link")


def test_symlinked_engines_folder_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.engine").write_bytes(b"e" * 10)
    (bundle_copy / "engines").symlink_to(elsewhere)
    sha = hashlib.sha256(b"e" * 10).hexdigest()
    edit_manifest(bundle_copy, lambda m: m["artifacts"].update(
        {"engines/x.engine": {"kind": "other", "sha256": sha, "bytes": 10}}))
    code, _, err = run("info", "-b", str(bundle_copy))
    one_line(code, err, "symbolic link")


# ================================================================== manifest structure (never exit 3)
MANIFEST_DAMAGE = {
    "artifacts is a list": lambda m: m.update(artifacts=list(m["artifacts"])),
    "artifact entry is a string": lambda m: m["artifacts"].update({"model.onnx": "x"}),
    "bytes missing": lambda m: m["artifacts"]["model.onnx"].pop("bytes"),
    "bytes negative": lambda m: m["artifacts"]["model.onnx"].update(bytes=-1),
    "bytes is true": lambda m: m["artifacts"]["model.onnx"].update(bytes=True),
    "sha256 short": lambda m: m["artifacts"]["model.onnx"].update(sha256="abc"),
    "precision unknown": lambda m: m["artifacts"]["model.onnx"].update(precision="fp8"),
    "channels not a number": lambda m: m["input"].update(channels="abc"),
    "channels disagree": lambda m: m["input"].update(channels=3),
    "base channels zero": lambda m: m["model"]["config"].update(base_channels=0),
    "ct window without level": lambda m: m["preprocessing"].update(normalize={"kind": "ct_window", "width": 400}),
    "ct window width zero": lambda m: m["preprocessing"].update(normalize={"kind": "ct_window", "level": 0,
                                                                           "width": 0}),
    "scale divisor NaN": lambda m: m["preprocessing"].update(normalize={"kind": "scale", "divisor": float("nan")}),
    "mean-std wrong length": lambda m: m["preprocessing"].update(normalize={"kind": "mean_std", "mean": [0, 0, 0],
                                                                           "std": [1, 1, 1]}),
    "unknown normalisation": lambda m: m["preprocessing"].update(normalize={"kind": "magic"}),
    "postprocessing unknown": lambda m: m["postprocessing"].update(kind="softmax3d"),
    "threshold above 1": lambda m: m.update(postprocessing={"kind": "sigmoid_threshold", "threshold": 1.5}),
    "schema version as text": lambda m: m.update(schema_version="1"),
    "format missing": lambda m: m.pop("format"),
    "verification is a list": lambda m: m.update(verification=[]),
    "golden source not a list": lambda m: m.update(golden={"source": "x"}),
    "engine without profiles": lambda m: m["artifacts"]["golden.npz"].update(kind="tensorrt-engine", gpu={},
                                                                              tensorrt="10.3"),
    "model missing": lambda m: m.pop("model"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_is_one_line_exit_2(bundle_copy: Path, case: str) -> None:
    edit_manifest(bundle_copy, MANIFEST_DAMAGE[case])
    before = snapshot(bundle_copy)
    code, _, err = run("info", "-b", str(bundle_copy))
    one_line(code, err, "manifest" if case == "format missing" else str(bundle_copy))
    code, _, err = run("quantize", "-b", str(bundle_copy), "--precision", "fp16")
    assert code == 2, err
    assert snapshot(bundle_copy) == before


@pytest.mark.parametrize(("content", "match"), [
    (b"", "unreadable"), (b"[1, 2]", "must be an object"), (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nests deeper"), (b"{" * 10, "unreadable"),
    (b'{"format": "attunet-deploy-bundle", "schema_version": 1, "model": NaN}', "model must be an object"),
])
def test_unreadable_manifest_text(bundle_copy: Path, content: bytes, match: str) -> None:
    (bundle_copy / "manifest.json").write_bytes(content)
    code, _, err = run("verify", "-b", str(bundle_copy))
    one_line(code, err, match)


def test_manifest_size_is_bounded(bundle_copy: Path) -> None:
    code, _, err = run("info", "-b", str(bundle_copy), env={"ATTDEPLOY_MAX_MANIFEST_MB": "0.001"})
    one_line(code, err, "ATTDEPLOY_MAX_MANIFEST_MB")


def test_manifest_that_is_a_fifo_does_not_hang(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    os.mkfifo(bundle_copy / "manifest.json")
    proc = subprocess.run([*EXE, "info", "-b", str(bundle_copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


def _valid_manifest(small_bundle: Path) -> dict[str, Any]:
    return json.loads((small_bundle / "manifest.json").read_text())


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                           | st.text(max_size=12),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifest_loader(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    """Any mutation of a valid manifest: Bundle.load succeeds or raises BundleError, nothing else,
    and never touches a file."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("weights.pt", "model.onnx", "golden.npz"):
        os.link(small_bundle / name, root / name)  # hard links: a write would show in small_bundle too
    m = _valid_manifest(small_bundle)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(m)
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            m = data.draw(json_values) if action == "replace" else m
            continue
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if action == "replace":
            parent[path[-1]] = data.draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=20))] = data.draw(json_values)
    (root / "manifest.json").write_text(json.dumps(m))
    before = snapshot(small_bundle)
    try:
        b = Bundle.load(root)
    except BundleError:
        pass
    else:
        b.golden  # noqa: B018 - accessors must not raise on a validated manifest
        _ = (b.in_channels, b.out_channels, b.divisor, b.spec, b.artifacts, b.source)
    assert snapshot(small_bundle) == before


# ================================================================== image readers
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".npy", ".npz", ".png", ".tif", ".dcm", ".nii", ".nii.gz", ".jpg", ".bmp"]),
       head=st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n", b"II*\x00",
                             b"\x00" * 128 + b"DICM", b"\x5c\x01\x00\x00"]),
       body=st.binary(max_size=600))
def test_fuzz_image_readers_raise_input_error_only(tmp_path_factory: pytest.TempPathFactory, suffix: str,
                                                    head: bytes, body: bytes) -> None:
    from attunet_deploy.io.images import read_file
    from attunet_deploy.io.labels import read_label_file

    path = tmp_path_factory.mktemp("img") / f"x{suffix}"
    path.write_bytes(head + body)
    for reader in (lambda: read_file(path, 1), lambda: read_label_file(path, 1)):
        try:
            out = reader()
        except InputError:
            continue
        assert isinstance(out, list)


def _npy_with_header(path: Path, shape: tuple[int, ...], dtype: str = "<f4") -> None:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header = header + " " * (118 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 64)


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: _npy_with_header(p / "huge.npy", (1, 1, 200_000, 200_000)), "above the limit"),
    (lambda p: _npy_with_header(p / "stack.npy", (100_000, 1, 512, 512)), "ATTDEPLOY_MAX_IMAGE_FILE_MB"),
    (lambda p: _npy_with_header(p / "obj.npy", (4, 4), "|O"), "not numeric"),
    (lambda p: np.save(p / "c.npy", np.ones((8, 8), np.complex64)), "complex"),
    (lambda p: np.save(p / "s.npy", np.array(["a", "b"])), "not numeric"),
    (lambda p: np.save(p / "e.npy", np.zeros((0, 5), np.float32)), "empty"),
    (lambda p: (p / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "cannot read"),
    (lambda p: os.mkfifo(p / "f.npy"), "not a regular file"),
])
def test_hostile_images_for_predict(small_bundle: Path, tmp_path: Path, make: Any, match: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    make(inputs)
    target = next(inputs.iterdir())
    proc = subprocess.run([*EXE, "predict", "-b", str(small_bundle), str(target), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    one_line(proc.returncode, proc.stderr, match)
    assert not (tmp_path / "out").exists()  # nothing written, no empty folder left


def test_image_pixel_limit_names_its_variable(small_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "s.png")
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "s.png"), "-o", str(tmp_path / "o"),
                       env={"ATTDEPLOY_MAX_IMAGE_PIXELS": "100"})
    one_line(code, err, "ATTDEPLOY_MAX_IMAGE_PIXELS")


def test_complex_nifti_is_refused_like_complex_npy(small_bundle: Path, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.ones((16, 16, 2), np.complex64), np.eye(4)), str(tmp_path / "c.nii.gz"))
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "c.nii.gz"), "-o", str(tmp_path / "o"))
    one_line(code, err, "complex")
    assert "Warning" not in err


def test_dicom_header_claiming_a_huge_image(small_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from attunet_deploy.demo.ctseries import write_ct_series

    (s,) = write_ct_series(tmp_path / "d", 1, (32, 32))
    import pydicom

    ds = pydicom.dcmread(s.path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(s.path)
    code, _, err = run("predict", "-b", str(small_bundle), str(s.path), "-o", str(tmp_path / "o"))
    one_line(code, err, "above the limit")


# ================================================================== bounded checkpoints
@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory", "too large", "zip bomb"])
def test_hostile_checkpoints(tmp_path: Path, small_ckpt: Path, kind: str) -> None:
    import zipfile

    env = None
    if kind == "fifo":
        ckpt = tmp_path / "c.pth"
        os.mkfifo(ckpt)
    elif kind == "devzero":
        ckpt = Path("/dev/zero")
    elif kind == "directory":
        ckpt = tmp_path
    elif kind == "too large":
        ckpt, env = small_ckpt, {"ATTDEPLOY_MAX_CHECKPOINT_MB": "0.01"}
    else:
        ckpt = tmp_path / "bomb.pth"
        with zipfile.ZipFile(ckpt, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("archive/data.pkl", b"\x00" * (64 << 20))
        env = {"ATTDEPLOY_MAX_CHECKPOINT_MB": "16"}
    proc = subprocess.run([*EXE, "export", str(ckpt), "-o", str(tmp_path / "b")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    match = {"fifo": "not a regular file", "devzero": "not a regular file", "directory": "directory",
             "too large": "ATTDEPLOY_MAX_CHECKPOINT_MB", "zip bomb": "unpacked"}[kind]
    one_line(proc.returncode, proc.stderr, match)
    assert not (tmp_path / "b").exists()


def test_golden_set_size_is_bounded(bundle_copy: Path) -> None:
    code, _, err = run("verify", "-b", str(bundle_copy), "--backend", "ort", env={"ATTDEPLOY_MAX_GOLDEN_MB": "0.01"})
    one_line(code, err, "ATTDEPLOY_MAX_GOLDEN_MB")


# ================================================================== only what we made
def test_foreign_folder_with_a_manifest_is_not_a_bundle(tmp_path: Path, small_ckpt: Path) -> None:
    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "manifest.json").write_text('{"name": "x"}')
    (w / "src" / "app.js").write_text("keep")
    before = snapshot(w)
    code, _, err = run("export", str(small_ckpt), "-o", str(w))
    one_line(code, err, "not a bundle")
    code, _, err = run("export", str(small_ckpt), "-o", str(w), "--force")
    one_line(code, err, "was not made by attdeploy")
    assert snapshot(w) == before


def test_force_adds_files_without_touching_the_users(tmp_path: Path, small_ckpt: Path) -> None:
    w = tmp_path / "w"
    (w / "src").mkdir(parents=True)
    (w / "src" / "app.js").write_text("keep")
    (w / "notes.txt").write_text("mine")
    code, _, err = run("export", str(small_ckpt), "-o", str(w), "--force", "--exporter", "torchscript")
    assert code == 0, err
    assert (w / "src" / "app.js").read_text() == "keep" and (w / "notes.txt").read_text() == "mine"
    Bundle.load(w)


def test_reexport_keeps_the_users_files_inside_the_bundle(bundle_copy: Path, small_ckpt: Path) -> None:
    (bundle_copy / "my_notes.txt").write_text("keep me")
    (bundle_copy / "model.fp16.onnx").write_text("not listed: not ours")
    code, _, err = run("export", str(small_ckpt), "-o", str(bundle_copy), "--exporter", "torchscript")
    assert code == 0, err
    assert (bundle_copy / "my_notes.txt").read_text() == "keep me"
    assert (bundle_copy / "model.fp16.onnx").read_text() == "not listed: not ours"


@pytest.mark.parametrize("out", ["file", "dot", "symlink", "long name"])
def test_export_target_forms(tmp_path: Path, small_bundle: Path, small_ckpt: Path, out: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--exporter", "torchscript"]
    if out == "file":
        (tmp_path / "f").write_text("x")
        code, _, err = run("export", str(small_ckpt), "-o", str(tmp_path / "f"), *args)
        one_line(code, err, "not a directory")
        return
    if out == "dot":
        (tmp_path / "here").mkdir()
        monkeypatch.chdir(tmp_path / "here")
        code, _, err = run("export", str(small_ckpt), "-o", ".", *args)
        assert code == 0, err
        Bundle.load(tmp_path / "here")
    elif out == "symlink":
        real = tmp_path / "real"
        shutil.copytree(small_bundle, real)
        (tmp_path / "link").symlink_to(real)
        code, _, err = run("export", str(small_ckpt), "-o", str(tmp_path / "link"), *args)
        assert code == 0, err
        assert (tmp_path / "link").is_symlink() and Bundle.load(real)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    else:
        name = tmp_path / ("n" * 245)
        code, _, err = run("export", str(small_ckpt), "-o", str(name), *args)
        assert code == 0, err
        Bundle.load(name)


# ================================================================== transactions
def _calib(tmp_path: Path) -> Path:
    """Calibration images 10^4 times brighter than the golden set: activation ranges so wide that every
    golden image quantises to nothing (mean Dice 0), a verification that fails every time."""
    np.save(tmp_path / "c.npy", 1e4 * np.random.default_rng(1).random((3, 1, 48, 48), dtype=np.float32))
    return tmp_path / "c.npy"


FAILING_COMMANDS = {
    "quantize keep-fp32 typo": lambda b, t: ["quantize", "-b", b, "--precision", "fp16", "--fp16-keep-fp32", "nope"],
    "quantize empty calib": lambda b, t: ["quantize", "-b", b, "--calib", str(t / "empty")],
    "quantize calib missing": lambda b, t: ["quantize", "-b", b, "--calib", str(t / "missing")],
    "quantize max-samples 0": lambda b, t: ["quantize", "-b", b, "--max-samples", "0"],
    "quantize int8 misses Dice": lambda b, t: ["quantize", "-b", b, "--calib", str(_calib(t)), "--precision",
                                                "int8", "--method", "minmax"],
    "export check-rel-l2 -1": lambda b, t: ["export", "-o", b, "--check-rel-l2", "-1"],
    "export parity fails": lambda b, t: ["export", str(t / "ck.pth"), "-o", b, "--check-rel-l2", "0",
                                         "--exporter", "torchscript"],
    "export bad normalize": lambda b, t: ["export", "-o", b, "--normalize", "scale:nan"],
    "export bad opset": lambda b, t: ["export", "-o", b, "--opset", "5"],
    "verify misses tolerance": lambda b, t: ["verify", "-b", b, "--rel-l2", "0", "--precision", "fp32"],
    "build without TensorRT": lambda b, t: ["build", "-b", b, "--precision", "fp16"],
    "build workspace 0": lambda b, t: ["build", "-b", b, "--precision", "fp16", "--workspace-mb", "0"],
}


@pytest.mark.parametrize("case", sorted(FAILING_COMMANDS))
def test_failed_commands_leave_the_bundle_byte_identical(qbundle: Path, tmp_path: Path, small_ckpt: Path,
                                                         case: str) -> None:
    (tmp_path / "empty").mkdir()
    shutil.copy(small_ckpt, tmp_path / "ck.pth")
    before = snapshot(qbundle)
    code, _, err = run(*FAILING_COMMANDS[case](str(qbundle), tmp_path))
    assert code == (1 if case in ("quantize int8 misses Dice", "export parity fails", "verify misses tolerance")
                    else 2), err
    assert "Traceback" not in err and "unexpected" not in err
    assert snapshot(qbundle) == before
    assert not list((qbundle / ".attdeploy").glob("txn-*"))


#: Seconds after the transaction opens at which the signal lands; ATTDEPLOY_INTERRUPT_SEED draws other
#: moments (run it with 20 seeds in a row after changing the commit path).
_INTERRUPT_RNG = np.random.default_rng(int(os.environ.get("ATTDEPLOY_INTERRUPT_SEED", "19")))
_MOMENTS = [round(float(t), 3) for t in _INTERRUPT_RNG.uniform(0.0, 1.5, 2)]


@pytest.mark.parametrize("moment", _MOMENTS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_quantize_leaves_the_bundle_byte_identical(qbundle: Path, tmp_path: Path, sig: int,
                                                                moment: float) -> None:
    calib = tmp_path / "many.npy"
    np.save(calib, np.random.default_rng(2).random((48, 1, 64, 64), dtype=np.float32))
    before = snapshot(qbundle)
    proc = subprocess.Popen([*EXE, "quantize", "-b", str(qbundle), "--calib", str(calib), "--precision", "int8",
                             "--max-samples", "48"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((qbundle / ".attdeploy").glob("txn-*")) and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(moment)  # anywhere in calibration, quantisation or the lint
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # 128 + signal, or -signal where CPython re-raises SIGINT on its way out (shells show 130 for both)
    assert proc.returncode in (0, 128 + sig, -sig), err
    assert "Traceback" not in err and "unexpected" not in err, err
    after = snapshot(qbundle)
    if after != before:  # the signal came during or after the commit (held back there): the new state, whole
        b = Bundle.load(qbundle)  # every sha256 checked
        assert after["model.int8.onnx"] != before["model.int8.onnx"] and "model.int8.onnx" in b.artifacts
    else:
        assert proc.returncode != 0, err
    assert not list((qbundle / ".attdeploy").glob("txn-*"))
    listed = set(Bundle.load(qbundle).artifacts) | {"manifest.json"}
    assert set(snapshot(qbundle)) <= listed | set(before)  # no stray file (e.g. model-inferred.onnx) left behind


def test_kill_9_mid_commit_is_rolled_forward(qbundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit cut short after its journal is finished by the next command: old or new, never a mix."""
    import attunet_deploy.bundle.txn as bundle_mod

    b = Bundle.load(qbundle)
    old = snapshot(qbundle)
    real_replace = os.replace

    def dying_replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("bundle/model.int8.onnx"):
            raise SystemExit("killed")  # like kill -9 between two renames of the commit (fp16 moved, int8 not)
        real_replace(src, dst)

    txn = b.transaction()
    txn.stage("model.int8.onnx").write_bytes(b"new int8 graph")
    txn.add_artifact("model.int8.onnx", kind="onnx", precision="int8")
    txn.stage("model.fp16.onnx").write_bytes(b"new fp16 graph")
    txn.add_artifact("model.fp16.onnx", kind="onnx", precision="fp16")
    monkeypatch.setattr(bundle_mod.os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        txn.commit()
    monkeypatch.setattr(bundle_mod.os, "replace", real_replace)
    txn.lock.release()  # the killed process's lock goes with it
    half = snapshot(qbundle)
    assert half["model.fp16.onnx"] != old["model.fp16.onnx"] and half["model.int8.onnx"] == old["model.int8.onnx"]
    with pytest.raises(BundleError):  # half applied on disk: a reader that could not finish it would see a mix
        Bundle(qbundle, b.manifest).check_artifacts()
    loaded = Bundle.load(qbundle)  # ... and finished by the next reader with write access
    assert (qbundle / "model.int8.onnx").read_bytes() == b"new int8 graph"
    assert (qbundle / "model.fp16.onnx").read_bytes() == b"new fp16 graph"
    assert loaded.manifest["artifacts"]["model.int8.onnx"]["bytes"] == len(b"new int8 graph")
    assert not list((qbundle / ".attdeploy").glob("txn-*"))


def test_uncommitted_staging_of_a_killed_writer_is_dropped(qbundle: Path) -> None:
    before = snapshot(qbundle)
    stale = qbundle / ".attdeploy" / "txn-999999-dead"
    (stale / "files").mkdir(parents=True)
    (stale / "files" / "model.onnx").write_bytes(b"half written")
    code, _, err = run("quantize", "-b", str(qbundle), "--precision", "fp16", "--no-verify")
    assert code == 0, err
    assert not stale.exists()
    after = snapshot(qbundle)
    assert after["model.onnx"] == before["model.onnx"]


# ================================================================== one writer at a time
def test_second_writer_is_told_the_bundle_is_busy(qbundle: Path, tmp_path: Path) -> None:
    before = snapshot(qbundle)
    with WriterLock(qbundle):
        proc = subprocess.run([*EXE, "quantize", "-b", str(qbundle), "--precision", "fp16"], capture_output=True,
                              text=True, timeout=120)
        one_line(proc.returncode, proc.stderr, "is busy")
        assert f"pid {os.getpid()}" in proc.stderr
        proc = subprocess.run([*EXE, "export", "-o", str(qbundle)], capture_output=True, text=True, timeout=120)
        one_line(proc.returncode, proc.stderr, "is busy")
        # readers are not blocked by a writer
        code, _, err = run("info", "-b", str(qbundle))
        assert code == 0, err
        code, _, err = run("verify", "-b", str(qbundle), "--backend", "ort", "--precision", "fp32")
        assert code == 0 and "not recorded in the manifest" in err and "busy" in err
    assert snapshot(qbundle) == before


def test_two_concurrent_quantize_runs_never_interleave(qbundle: Path) -> None:
    procs = [subprocess.Popen([*EXE, "quantize", "-b", str(qbundle), "--precision", "fp16", "--no-verify"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0 and all(c in (0, 2) for c in codes)
    # the loser is told the bundle is busy, or (if it loaded before the winner committed) that the
    # bundle changed under it; either way it writes nothing
    assert all("busy" in e or "changed by another command" in e for c, e in results if c == 2)
    Bundle.load(qbundle)  # every sha256 matches: the manifest agrees with the files


# ================================================================== option validation
OPTIONS = [
    (["bench", "--backend", "ort", "--duration", "nan"], "--duration"),
    (["bench", "--backend", "ort", "--duration", "inf"], "--duration"),
    (["bench", "--backend", "ort", "--duration", "-1"], "--duration"),
    (["bench", "--backend", "ort", "--iterations", "0"], "--iterations"),
    (["bench", "--backend", "ort", "--warmup", "-1"], "--warmup"),
    (["bench", "--backend", "ort", "--threads", "0"], "--threads"),
    (["bench", "--backend", "ort", "--concurrency", "0"], "--concurrency"),
    (["bench", "--backend", "ort", "--shape", "0x1x8x8"], "bad shape"),
    (["bench", "--backend", "ort", "--shape", "1x1x100000x100000"], "ATTDEPLOY_MAX_IMAGE_PIXELS"),
    (["bench", "--backend", "ort", "--iterations", "x"], "--iterations"),
    (["bench", "--backend", "ort", "--iterations", "2", "--json", "{tmp}"], "is a directory"),
    (["bench", "--backend", "ort", "--iterations", "2", "--json", "{tmp}/no/such/x.json"], "does not exist"),
    (["verify", "--rel-l2", "nan"], "--rel-l2"),
    (["verify", "--rel-l2", "-1"], "--rel-l2"),
    (["verify", "--pixel-agreement", "1.5"], "--pixel-agreement"),
    (["verify", "--mean-dice", "fp16=inf"], "--mean-dice"),
    (["verify", "--worst-dice", "fp64=0.5"], "unknown precision"),
    (["verify", "--max-dice-drop", "2"], "--max-dice-drop"),
    (["verify", "--save-diff", "{tmp}/notempty"], "new or empty folder"),
    (["export", "-o", "{tmp}/x", "--normalize", "ct-window:40,0"], "--normalize"),
    (["export", "-o", "{tmp}/x", "--normalize", "mean-std:0,-1"], "--normalize"),
    (["export", "-o", "{tmp}/x", "--normalize", "scale:inf"], "--normalize"),
    (["export", "-o", "{tmp}/x", "--check-rel-l2", "nan"], "--check-rel-l2"),
    (["export", "-o", "{tmp}/x", "--opset", "5"], "--opset"),
    (["quantize", "--max-samples", "-5"], "--max-samples"),
    (["build", "--precision", "fp16", "--workspace-mb", "-3"], "--workspace-mb"),
    (["build", "--precision", "fp16", "--min-shape", "1x1x100x100", "--max-shape", "1x1x128x128"], "multiples"),
    (["pipeline", "-o", "{tmp}/x", "--bench-iterations", "0"], "--iterations"),
]


@pytest.mark.parametrize(("args", "match"), OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OPTIONS])
def test_option_values_are_validated_before_work(qbundle: Path, tmp_path: Path, args: list[str], match: str) -> None:
    (tmp_path / "notempty").mkdir()
    (tmp_path / "notempty" / "x").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] in ("bench", "verify", "quantize", "build"):
        args = [args[0], "-b", str(qbundle), *args[1:]]
    before = snapshot(qbundle)
    code, _, err = run(*args)
    one_line(code, err, match)
    assert snapshot(qbundle) == before
    assert not (tmp_path / "x").exists()


# ================================================================== outputs never collide
def test_predict_keeps_distinct_inputs_apart(small_bundle: Path, tmp_path: Path) -> None:
    for sub, value in (("a", 0.0), ("b", 1.0)):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "scan.npy", np.full((40, 40), value, np.float32))
    np.save(tmp_path / "a" / "x.npy", np.zeros((40, 40), np.float32))
    from PIL import Image

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "a" / "x.png")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a" / "scan.npy"), str(tmp_path / "b" / "scan.npy"), str(tmp_path / "a" / "x.npy"),
              str(tmp_path / "a" / "x.png")]
    code, _, err = run("predict", "-b", str(small_bundle), *inputs, "-o", str(out), "--backend", "ort")
    assert code == 0, err
    masks = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_mask.npy"))
    assert masks == ["a/scan_mask.npy", "a/x_npy_mask.npy", "a/x_png_mask.npy", "b/scan_mask.npy"]
    # a second run refuses to overwrite; --overwrite replaces
    before = snapshot(out)
    assert np.load(out / "b" / "scan_mask.npy").shape == (40, 40)
    code, _, err = run("predict", "-b", str(small_bundle), *inputs, "-o", str(out))
    one_line(code, err, "--overwrite")
    assert snapshot(out) == before
    code, _, err = run("predict", "-b", str(small_bundle), *inputs, "-o", str(out), "--overwrite", "--backend", "ort")
    assert code == 0, err


def test_predict_writes_nothing_when_a_later_input_is_bad(small_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "good.npy", np.zeros((40, 40), np.float32))
    bad = np.zeros((40, 40), np.float32)
    bad[3, 3] = np.inf
    np.save(tmp_path / "zbad.npy", bad)
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "good.npy"), str(tmp_path / "zbad.npy"),
                       "-o", str(tmp_path / "out"))
    one_line(code, err, "NaN/Inf")
    assert not (tmp_path / "out").exists()


def test_predict_output_that_is_a_file(small_bundle: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((40, 40), np.float32))
    (tmp_path / "out").write_text("x")
    code, _, err = run("predict", "-b", str(small_bundle), str(tmp_path / "a.npy"), "-o", str(tmp_path / "out"))
    one_line(code, err, "not a directory")


# ================================================================== stderr: one line, no library noise
def test_protocol_4_pickle_checkpoint_gives_no_library_warning(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "p4.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    proc = subprocess.run([*EXE, "export", str(tmp_path / "p4.pth"), "-o", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    one_line(proc.returncode, proc.stderr, "error")
    assert "Warning" not in proc.stderr


def test_memory_guard_refuses_a_batch_that_cannot_fit(small_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attunet_deploy import load_runner
    from attunet_deploy.runtimes import base

    monkeypatch.setattr(base, "activation_bytes", lambda shape, base_channels: 1 << 60)
    # (the self-check's own small input would meet the patched guard first: this tests infer's guard)
    with load_runner(small_bundle, backend="ort", self_check=False) as r, \
            pytest.raises(InputError, match="ATTDEPLOY_MEMORY_CHECK"):
        r.infer(np.zeros((1, 1, 32, 32), np.float32))


def test_a_writer_never_commits_over_a_newer_manifest(qbundle: Path) -> None:
    """Load, let another command commit, then write: refused, and the newer bundle stays whole."""
    import onnx

    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    conv = next(n.name for n in onnx.load(str(qbundle / "model.onnx")).graph.node if n.op_type == "Conv")
    stale = Bundle.load(qbundle)
    # another command commits
    quantize_bundle(Bundle.load(qbundle), QuantizeSettings(precisions=("fp16",), verify=False, fp16_keep_fp32=(conv,)))
    after = snapshot(qbundle)
    with pytest.raises(BundleError, match="changed by another command"):
        quantize_bundle(stale, QuantizeSettings(precisions=("fp16",), verify=False))
    assert snapshot(qbundle) == after
    Bundle.load(qbundle)


_SIGNAL_IN_COMMIT = """
import os, signal, sys, threading, time
import attunet_deploy.bundle.txn as bundle_mod
from attunet_deploy.bundle import Bundle

root = sys.argv[1]
b = Bundle.load(root)
real_replace = os.replace
fired = []

def replace(src, dst):
    real_replace(src, dst)
    if not fired and str(dst).endswith("model.int8.onnx"):
        fired.append(1)
        t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
        t.start()
        t.join()
        time.sleep(0.05)  # the main thread passes several bytecodes with the signal pending

new = b"not really a graph, but bytes with a hash"
try:
    with b.transaction() as txn:
        txn.stage("model.int8.onnx").write_bytes(new)
        txn.add_artifact("model.int8.onnx", kind="onnx", precision="int8")
        bundle_mod.os.replace = replace
        txn.commit()
except KeyboardInterrupt:
    bundle_mod.os.replace = real_replace
    sys.exit(0 if fired and Bundle.load(root).read_artifact("model.int8.onnx") == new else 5)
sys.exit(4)
"""


def test_a_signal_during_a_commit_is_held_until_the_commit_is_whole(qbundle: Path) -> None:
    """A SIGINT that reaches another thread of the process (ONNX Runtime's workers) mid-commit used
    to run its Python handler between two renames; the commit must finish first, then the
    interruption is raised. Run in a process of its own: it signals itself."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_IN_COMMIT, str(qbundle)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    Bundle.load(qbundle)  # every sha256 checked: never the new file with the old manifest
    assert not list((qbundle / ".attdeploy").glob("txn-*"))
