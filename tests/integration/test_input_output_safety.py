"""Untrusted input and output paths: labels, output folders, the Triton client, DICOM SEG files,
memory. Each case asserts the exit code, the single stderr line, a byte-identical bundle
and, where it applies, peak memory or wall time."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bundle_safety import EXE, one_line, run, snapshot

from attunet_deploy.errors import InputError

PEAK_RSS = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(p.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
sys.exit(p.returncode)
"""


def run_measured(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, int, float]:
    """(exit code, stderr, peak RSS of the command in MB, wall seconds): the command runs as the only
    child of a fresh wrapper, so its peak is its own."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, *EXE, *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    return p.returncode, p.stderr, int(p.stdout.strip().splitlines()[-1]), time.monotonic() - t0


@pytest.fixture
def demo_copy(tmp_path: Path, demo_bundle: Path) -> Path:
    dst = tmp_path / "B"
    shutil.copytree(demo_bundle, dst)
    return dst


# ================================================================== round-2 residue
def test_random_bytes_are_never_an_unexpected_error(tmp_path: Path) -> None:
    from attunet_deploy.checkpoint import load_checkpoint
    from attunet_deploy.errors import CheckpointError

    rng = np.random.default_rng(19)
    # Seeded: the same files every run (1 in 10 plain random files used to raise IndexError). Besides
    # plain noise, noise behind the magic bytes of a zip archive and of pickle protocols 2 and 4, which
    # get past a first look at the format and into torch's own parser.
    prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95"]
    for i in range(240):
        f = tmp_path / f"r{i}.pth"
        f.write_bytes(prefixes[i % 4] + rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError):
            load_checkpoint(f)
    code, _, err = run("export", str(tmp_path / "r0.pth"), "-o", str(tmp_path / "b"))
    one_line(code, err, "cannot read")


@pytest.mark.parametrize("payload", ["list", "own format, list state_dict", "tuple"])
def test_checkpoint_holding_a_list(tmp_path: Path, payload: str) -> None:
    import torch

    obj = {"list": [1, 2, 3], "tuple": ("a", torch.zeros(1)),
           "own format, list state_dict": {"format": "attunet-deploy/1",
                                           "config": {"in_channels": 1, "out_channels": 1, "base_channels": 4},
                                           "state_dict": [("a", torch.zeros(1))]}}[payload]
    torch.save(obj, tmp_path / "c.pth")
    code, _, err = run("export", str(tmp_path / "c.pth"), "-o", str(tmp_path / "b"))
    one_line(code, err, "expected a")
    assert not (tmp_path / "b").exists()


def test_inflating_zip_checkpoint_is_refused_before_it_inflates(tmp_path: Path) -> None:
    import zipfile

    ckpt = tmp_path / "bomb.pth"
    block = b"\0" * (16 << 20)
    with zipfile.ZipFile(ckpt, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("archive/data/0", "w") as fh:
        for _ in range(64):  # 1 GiB inflated, about 1 MB on disk
            fh.write(block)
    assert ckpt.stat().st_size < 4 << 20
    code, err, peak, _ = run_measured("export", str(ckpt), "-o", str(tmp_path / "b"))
    one_line(code, err, "inflates")
    assert peak < 1500, f"peak RSS {peak} MB"


def test_shapes_implying_a_huge_model_are_refused_before_allocation(tmp_path: Path) -> None:
    import torch
    from popular import popular_state_dict

    sd = popular_state_dict(1, 1, 4, seed=0)
    sd["Conv1.conv.0.weight"] = torch.zeros(1, 1, 3, 3).expand(2_000_000, 1, 3, 3)  # stride 0: a tiny file
    torch.save(sd, tmp_path / "wide.pth")
    code, err, peak, _ = run_measured("export", str(tmp_path / "wide.pth"), "-o", str(tmp_path / "b"))
    one_line(code, err, "ATTDEPLOY_MAX_CHECKPOINT_MB")
    assert peak < 1500


def test_predict_inputs_with_names_at_the_file_name_limit(small_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    img = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    names = ["short.npy", "x" * 247 + ".npy", "\U0001d538" * 61 + ".npy"]  # 251 bytes; 244 bytes in 61 characters
    for n in names:
        np.save(src / n, img)
    code, _, err = run("predict", "-b", str(small_bundle), *(str(src / n) for n in names), "-o", str(tmp_path / "o"))
    assert code == 0, err
    outs = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len([o for o in outs if o.endswith("_mask.npy")]) == 3
    assert all(len(o.encode()) <= 255 for o in outs) and not [o for o in outs if o.startswith(".")]


def test_json_output_inside_the_bundle_is_refused(demo_copy: Path) -> None:
    before = snapshot(demo_copy)
    for cmd in (["verify", "--backend", "ort", "--precision", "fp32"], ["info"], ["bench", "--backend", "ort"]):
        code, _, err = run(*cmd, "-b", str(demo_copy), "--json", str(demo_copy / "manifest.json"))
        one_line(code, err, "inside the bundle")
    assert snapshot(demo_copy) == before


# ================================================================== labels
def _images_and_labels(tmp_path: Path) -> tuple[Path, Path]:
    from attunet_deploy.demo import make_phantom

    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    for k in range(3):
        hu, lab = make_phantom(100 + k, (64, 64))
        np.save(imgs / f"s{k}.npy", hu)
        np.save(labs / f"s{k}.npy", lab)
    return imgs, labs


def test_images_differing_only_by_extension_with_labels(demo_copy: Path, tmp_path: Path) -> None:
    from PIL import Image

    imgs, labs = _images_and_labels(tmp_path)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(imgs / "s0.png")
    before = snapshot(demo_copy)
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32", "--images",
                       str(imgs), "--labels", str(labs))
    one_line(code, err, "differ only by extension")
    code, _, err = run("export", "-o", str(tmp_path / "new"), "--images", str(imgs), "--labels", str(labs))
    one_line(code, err, "differ only by extension")
    assert snapshot(demo_copy) == before and not (tmp_path / "new").exists()


def test_label_with_more_slices_than_its_image(demo_copy: Path, tmp_path: Path) -> None:
    imgs, labs = _images_and_labels(tmp_path)
    lab = np.load(labs / "s1.npy")
    np.save(labs / "s1.npy", np.stack([lab, lab]))
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32", "--images",
                       str(imgs), "--labels", str(labs))
    one_line(code, err, "has 2 slice(s), image")


def test_class_index_labels_on_a_binary_model(demo_copy: Path, tmp_path: Path) -> None:
    imgs, labs = _images_and_labels(tmp_path)
    lab = np.load(labs / "s2.npy").astype(np.uint8)
    lab[:5] = 2
    np.save(labs / "s2.npy", lab)
    before = snapshot(demo_copy)
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32", "--images",
                       str(imgs), "--labels", str(labs))
    one_line(code, err, "holds 3 values (0, 1, 2)")
    assert snapshot(demo_copy) == before


@pytest.mark.parametrize(("shape", "match"), [((64, 64, 1), "channels-last"), ((64,), "expected [H, W]")])
def test_label_shape_messages(demo_copy: Path, tmp_path: Path, shape: tuple[int, ...], match: str) -> None:
    imgs, labs = _images_and_labels(tmp_path)
    np.save(labs / "s0.npy", np.zeros(shape, np.uint8))
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32", "--images",
                       str(imgs), "--labels", str(labs))
    one_line(code, err, match)


def test_verify_help_describes_its_own_images_option() -> None:
    code, out, _ = run("verify", "--help")
    assert code == 0 and "calibrates" not in out and "instead of the bundle's golden set" in " ".join(out.split())


# ================================================================== output paths
def _paths(tmp_path: Path, bundle: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    return {"dangling symlink": (tmp_path / "dangling", "symbolic link"),
            "below a regular file": (tmp_path / "afile" / "x", "is a file"),
            "under /proc": (Path("/proc/attdeploy-x"), "virtual filesystem"),
            "inside the bundle": (bundle / "diffs", "inside the bundle"),
            "bundle's staging": (bundle / ".attdeploy" / "txn-x", "inside the bundle")}


@pytest.mark.parametrize("case", ["dangling symlink", "below a regular file", "under /proc", "inside the bundle",
                                  "bundle's staging"])
def test_save_diff_paths_are_checked_before_any_work(demo_copy: Path, tmp_path: Path, case: str) -> None:
    path, match = _paths(tmp_path, demo_copy)[case]
    before = snapshot(demo_copy)
    t0 = time.monotonic()
    code, _, err = run("verify", "-b", str(demo_copy), "--save-diff", str(path))
    one_line(code, err, match)
    assert time.monotonic() - t0 < 5  # refused before the verification, not after it
    assert snapshot(demo_copy) == before


@pytest.mark.parametrize("case", ["below a regular file", "under /proc", "inside the bundle"])
def test_triton_and_predict_outputs_are_checked(demo_copy: Path, tmp_path: Path, case: str) -> None:
    pytest.importorskip("tritonclient")
    path, match = _paths(tmp_path, demo_copy)[case]
    before = snapshot(demo_copy)
    code, _, err = run("triton", "-b", str(demo_copy), "-o", str(path / "repo"))
    one_line(code, err, match)
    np.save(tmp_path / "img.npy", np.zeros((32, 32), np.float32))
    code, _, err = run("predict", "-b", str(demo_copy), str(tmp_path / "img.npy"), "-o", str(path))
    one_line(code, err, match)
    assert snapshot(demo_copy) == before


def test_predict_into_the_bundle_itself_is_refused(demo_copy: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "img.npy", np.zeros((32, 32), np.float32))
    before = snapshot(demo_copy)
    code, _, err = run("predict", "-b", str(demo_copy), str(tmp_path / "img.npy"), "-o", str(demo_copy))
    one_line(code, err, "inside the bundle")
    assert snapshot(demo_copy) == before


def test_two_triton_writers_of_one_repository(demo_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("tritonclient")
    repo = tmp_path / "repo"
    for _ in range(3):
        procs = [subprocess.Popen([*EXE, "triton", "-b", str(demo_bundle), "-o", str(repo), "--kind", "cpu"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        assert (repo / "README.md").is_file() and (repo / "attunet_cpu" / "config.pbtxt").is_file()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]


# ================================================================== Triton client
class _Silent:
    """A TCP server on 127.0.0.1 that accepts and never answers (stopped by the test)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for c in self.conns:
            c.close()
        self.sock.close()


class _HealthyButStuck(http.server.BaseHTTPRequestHandler):
    """Answers Triton's health and config calls, never an inference."""

    stuck = threading.Event()

    def do_GET(self) -> None:
        body = b"{}"
        if self.path.endswith("/config"):
            body = json.dumps({"name": "attunet_fp32", "max_batch_size": 8}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.stuck.wait(60)

    def log_message(self, *args: object) -> None:
        return


@pytest.mark.parametrize("server", ["accepts, never answers", "healthy, inference never answers"])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_hanging_triton_servers_fail_within_seconds(demo_copy: Path, server: str, command: str) -> None:
    pytest.importorskip("tritonclient")
    if server.startswith("accepts"):
        srv: object = _Silent()
        port = srv.port  # type: ignore[attr-defined]
    else:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButStuck)
        srv.daemon_threads = True  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, daemon=True).start()  # type: ignore[attr-defined]
        port = srv.server_address[1]  # type: ignore[attr-defined]
    before = snapshot(demo_copy)
    try:
        args = ["--backend", "triton", "--precision", "fp32"] + (["--iterations", "2"] if command == "bench" else [])
        if not server.startswith("accepts"):  # the request timeout (default 8 s) is the bound under test here
            args += ["--triton-timeout", "2"]
        t0 = time.monotonic()
        proc = subprocess.run([*EXE, command, "-b", str(demo_copy), *args, "--triton-url", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)
        wall = time.monotonic() - t0
    finally:
        if isinstance(srv, _Silent):
            srv.close()
        else:
            _HealthyButStuck.stuck.set()
            srv.shutdown()  # type: ignore[attr-defined]
            srv.server_close()  # type: ignore[attr-defined]
            _HealthyButStuck.stuck.clear()
    one_line(proc.returncode, proc.stderr, "within")
    assert wall < 15, f"{wall:.1f} s"
    assert snapshot(demo_copy) == before


@pytest.mark.parametrize("url", ["127.0.0.1:abc", "127.0.0.1:999999", "http://[::1", "127.0.0.1:0", "host only",
                                 "grpc://:8001", "http://a@b:1"])
def test_malformed_triton_urls(demo_copy: Path, url: str) -> None:
    pytest.importorskip("tritonclient")
    proc = subprocess.run([*EXE, "verify", "-b", str(demo_copy), "--backend", "triton", "--triton-url", url],
                          capture_output=True, text=True, timeout=60)
    one_line(proc.returncode, proc.stderr, "--triton-url")
    assert "Exception ignored" not in proc.stderr


def test_triton_timeout_is_validated(demo_copy: Path) -> None:
    for value in ("0", "-1", "nan", "1e9"):
        code, _, err = run("verify", "-b", str(demo_copy), "--backend", "triton", "--triton-url", "127.0.0.1:1",
                           "--triton-timeout", value)
        one_line(code, err, "--triton-timeout")


# ================================================================== DICOM SEG files
@pytest.fixture
def ct(tmp_path: Path) -> list:
    pytest.importorskip("highdicom")
    from attunet_deploy.demo.ctseries import write_ct_series

    return write_ct_series(tmp_path / "ct", 4, (64, 64), seed=5)


def _seg(bundle: Path, folder: Path, out: Path) -> tuple[int, str, str]:
    return run("predict", "-b", str(bundle), str(folder), "--dicom-seg", "-o", str(out), "--backend", "ort")


def test_dicom_slice_copied_under_another_name_is_used_once(demo_bundle: Path, ct: list, tmp_path: Path) -> None:
    import pydicom

    shutil.copyfile(ct[1].path, ct[1].path.with_name("copy_of_1.dcm"))
    code, _, err = _seg(demo_bundle, ct[0].path.parent, tmp_path / "segs")
    assert code == 0, err
    assert "copy_of_1.dcm" in err and "used once" in err
    (seg,) = (tmp_path / "segs").glob("*.dcm")
    refs = pydicom.dcmread(seg).ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert len({r.ReferencedSOPInstanceUID for r in refs}) == len(refs) == 4


@pytest.mark.parametrize("case", ["two slices at one position", "no position at all", "one slice without position",
                                  "no orientation", "one SOP Instance UID, two positions"])
def test_ambiguous_dicom_series_are_one_line_errors(demo_bundle: Path, ct: list, tmp_path: Path, case: str) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    def edit(path: Path, **changes: object) -> None:
        ds = pydicom.dcmread(path)
        for k, v in changes.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(path)

    match = "ImagePositionPatient"
    if case == "two slices at one position":
        extra = ct[1].path.with_name("extra.dcm")
        shutil.copyfile(ct[1].path, extra)
        edit(extra, SOPInstanceUID=generate_uid())
        match = "one slice position"
    elif case == "no position at all":
        for s in ct:
            edit(s.path, ImagePositionPatient=None)
    elif case == "one slice without position":
        edit(ct[2].path, ImagePositionPatient=None)
    elif case == "no orientation":
        for s in ct:
            edit(s.path, ImageOrientationPatient=None)
        match = "ImageOrientationPatient"
    else:
        edit(ct[3].path, SOPInstanceUID=ct[0].sop_instance_uid)
        match = "share SOP Instance UID"
    code, _, err = _seg(demo_bundle, ct[0].path.parent, tmp_path / "segs")
    one_line(code, err, match)
    assert not (tmp_path / "segs").exists() or not list((tmp_path / "segs").iterdir())


# ================================================================== memory
@pytest.fixture(scope="module")
def many_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 compressed .npz stacks of 128x128 slices: 2 MB on disk, 1.6 GB if every one were decoded."""
    folder = tmp_path_factory.mktemp("many-npz")
    rng = np.random.default_rng(3)
    base = np.zeros((640, 1, 128, 128), np.float32)
    for k in range(40):
        base[:, :, 50:60, 50:60] = rng.random()
        np.savez_compressed(folder / f"v{k:02d}.npz", images=base)
    return folder


def test_verify_images_samples_files_before_decoding(demo_copy: Path, many_npz: Path) -> None:
    assert sum(f.stat().st_size for f in many_npz.iterdir()) < 8 << 20
    # 64 images judged (not the default 512) keeps the test short; the files are sampled before
    # decoding either way: 40 files of 640 slices each would hold 1.6 GB decoded.
    code, err, peak, _ = run_measured("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32",
                                      "--images", str(many_npz), env={"ATTDEPLOY_MAX_VERIFY_IMAGES": "64"})
    assert code == 0, err
    assert peak < 1500, f"peak RSS {peak} MB"
    assert "judging 64 evenly spaced images" in " ".join(err.split())


def test_quantize_calib_samples_files_before_decoding(demo_copy: Path, many_npz: Path) -> None:
    code, err, peak, _ = run_measured("quantize", "-b", str(demo_copy), "--precision", "int8", "--no-verify",
                                      "--calib", str(many_npz), "--max-samples", "64")
    assert code == 0, err
    assert peak < 1500, f"peak RSS {peak} MB"


def test_held_images_budget_is_a_named_limit(demo_copy: Path, many_npz: Path) -> None:
    before = snapshot(demo_copy)
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "fp32", "--images",
                       str(many_npz), env={"ATTDEPLOY_MAX_HELD_IMAGES_MB": "4"})
    one_line(code, err, "ATTDEPLOY_MAX_HELD_IMAGES_MB")
    assert snapshot(demo_copy) == before


# ================================================================== records, options, pipeline
def test_replacing_a_graph_drops_its_old_records(demo_copy: Path) -> None:
    code, _, err = run("verify", "-b", str(demo_copy), "--backend", "ort", "--precision", "int8")
    assert code == 0, err
    assert "ort/int8" in json.loads((demo_copy / "manifest.json").read_text())["verification"]
    code, _, err = run("quantize", "-b", str(demo_copy), "--precision", "int8", "--no-verify", "--method", "minmax")
    assert code == 0, err
    records = json.loads((demo_copy / "manifest.json").read_text())["verification"]
    assert not [k for k, r in records.items() if r["precision"] == "int8"]
    code, out, _ = run("info", "-b", str(demo_copy), "--json", "-")
    assert code == 0 and not [k for k in json.loads(out)["verification"] if k.endswith("/int8")]


def test_max_dice_drop_with_fp16_only_is_refused(demo_copy: Path) -> None:
    before = snapshot(demo_copy)
    code, _, err = run("quantize", "-b", str(demo_copy), "--precision", "fp16", "--max-dice-drop", "0.01")
    one_line(code, err, "--max-dice-drop")
    assert snapshot(demo_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--calib"])  # --images alone takes the same branch (pipeline: images = calib)
def test_pipeline_with_one_image_skips_int8_the_same_way(tmp_path: Path, option: str) -> None:
    from attunet_deploy.demo import make_phantom

    hu, _ = make_phantom(7, (64, 64))
    np.save(tmp_path / "one.npy", hu)
    code, _, err = run("pipeline", "-o", str(tmp_path / "b"), option, str(tmp_path / "one.npy"),
                       "--bench-iterations", "1", "--shape", "1x1x32x32")
    assert code == 0, err
    assert "INT8 skipped" in err and "held out" in err
    assert "model.int8.onnx" not in json.loads((tmp_path / "b" / "manifest.json").read_text())["artifacts"]


# ================================================================== fuzzers: label folders and output paths
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_label_files(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    from attunet_deploy.io.labels import header_hw, read_label_file

    d = tmp_path_factory.mktemp("fuzz-labels")
    ndim = data.draw(st.integers(0, 5))
    shape = tuple(data.draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    dtype = data.draw(st.sampled_from(["u1", "i2", "f4", "f8", "?", "c8"]))
    arr = np.asarray(data.draw(st.lists(st.integers(-3, 300), min_size=1, max_size=4)) * 30)
    arr = np.resize(arr, shape).astype(dtype) if ndim else np.asarray(3, dtype=dtype)
    if dtype.startswith("f") and data.draw(st.booleans()) and arr.size:
        arr.flat[0] = np.nan
    f = d / "label.npy"
    np.save(f, arr)
    classes = data.draw(st.sampled_from([1, 2, 3]))
    for fn in (lambda: header_hw(f), lambda: read_label_file(f, classes)):
        try:
            fn()
        except InputError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["..", ".", "afile", "adir", "link", "dangling", "x" * 300, "new", "B",
                                       ".attdeploy", "\u00e9", "proc"]), min_size=1, max_size=4),
       kind=st.sampled_from(["file", "dir"]), absolute_proc=st.booleans())
def test_fuzz_output_paths(tmp_path_factory: pytest.TempPathFactory, small_bundle: Path, parts: list[str], kind: str,
                           absolute_proc: bool) -> None:
    from attunet_deploy.outputs import check_output

    d = tmp_path_factory.mktemp("fuzz-out")
    (d / "afile").write_text("x")
    (d / "adir").mkdir()
    (d / "link").symlink_to(d / "adir")
    (d / "dangling").symlink_to(d / "missing")
    shutil.copytree(small_bundle, d / "B")
    root = Path("/proc") if absolute_proc and parts[0] == "proc" else d
    path = root.joinpath(*parts)
    try:
        resolved = check_output(path, "-o", kind=kind, bundles=[d / "B"])
    except InputError:
        return
    assert not str(resolved).startswith(("/proc", "/sys", "/dev"))
    assert d / "B" not in (resolved, *resolved.parents)
    assert all(len(p.encode()) <= 255 for p in resolved.parts)
