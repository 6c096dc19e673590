"""Export of every model family from the checkpoints people have: the authors' 3D networks (their raw
state_dict in a DataParallel {"state_dict": ...} wrapper) and MONAI's AttentionUnet (2D and 3D). Each
is built with random weights and non-trivial BatchNorm statistics; export itself checks ONNX Runtime
against PyTorch on three shapes, one a multiple of no divisor (rel L2 <= 1e-5), and verify then judges
every CPU backend on the golden volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from attunet_deploy.bundle import Bundle  # noqa: E402
from attunet_deploy.cli import main  # noqa: E402
from attunet_deploy.models.oktay3d import Oktay3D, Oktay3DConfig  # noqa: E402


def _randomise_bn(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.7, 1.3)


def _oktay(path: Path, variant: str) -> None:
    torch.manual_seed(1)
    net = Oktay3D(Oktay3DConfig(variant=variant, in_channels=1, out_channels=2, feature_scale=16)).net
    _randomise_bn(net)
    # as the authors' training saves it: DataParallel keys inside a {"state_dict": ...} wrapper
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)


def _monai(path: Path, dims: int) -> None:
    from monai.networks.nets import AttentionUnet

    torch.manual_seed(2)
    net = AttentionUnet(spatial_dims=dims, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    _randomise_bn(net)
    torch.save(net.state_dict(), path)


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=True)
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("name, make, extra, layout, divisors", [
    ("oktay multi_att_dsv", lambda p: _oktay(p, "multi_att_dsv"), ["--roi", "32x32x32"], "NCDHW", (16, 16, 16)),
    ("oktay grid_attention", lambda p: _oktay(p, "grid_attention"), ["--roi", "16x32x32"], "NCDHW", (1, 16, 16)),
    ("monai 3D", lambda p: _monai(p, 3), ["--roi", "16x16x16", "--spacing", "2x1x1"], "NCDHW", (4, 4, 4)),
    ("monai 2D", lambda p: _monai(p, 2), [], "NCHW", (4, 4)),
])
def test_export_and_verify_each_family(tmp_path: Path, name: str, make, extra: list[str], layout: str,
                                       divisors: tuple[int, ...]) -> None:
    pytest.importorskip("monai")
    make(tmp_path / "ck.pth")
    code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), *extra)
    assert code == 0, err
    b = Bundle.load(tmp_path / "b")
    assert (b.layout, b.divisors) == (layout, divisors)
    assert b.family == ("oktay3d" if name.startswith("oktay") else "monai")
    assert b.manifest["verification"]["ort/fp32"]["rel_l2"] <= 1e-5
    shapes = [s[2:] for s in b.manifest["artifacts"]["golden.npz"]["shapes"]]
    assert any(any(v % d for v, d in zip(s, divisors)) for s in shapes)  # one size a multiple of no divisor
    code, out, err = run("verify", "-b", str(tmp_path / "b"), "--backend", "torch", "--backend", "ort",
                         "--backend", "ov", "--precision", "fp32", "--json", "-")
    assert code == 0, err
    rows = {r["backend"]: r for r in json.loads(out)["results"]}
    assert rows["torch"]["status"] == "pass" and rows["ort"]["status"] == "pass"
    assert rows["ov"]["status"] in ("pass", "unavailable")
    if layout == "NCDHW":
        assert b.sliding_window is not None and b.sliding_window.roi == tuple(int(v) for v in extra[1].split("x"))


def test_3d_options_are_checked(tmp_path: Path) -> None:
    _oktay(tmp_path / "ck.pth", "multi_att_dsv")
    for args, match in [(["--roi", "30x32x32"], "multiple of the model's divisor"),
                        (["--roi", "32x32"], "three positive numbers"),
                        (["--overlap", "1.0"], "overlap"),
                        (["--spacing", "1x0x1"], "three positive numbers"),
                        (["--arch", "monai"], "monai"),
                        (["--images", str(tmp_path)], "no volumes")]:
        code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), *args)
        assert code == 2 and match in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "b").exists()


def test_2d_checkpoint_refuses_3d_options(tmp_path: Path, small_ckpt: Path) -> None:
    code, _, err = run("export", str(small_ckpt), "-o", str(tmp_path / "b"), "--roi", "32x32x32")
    assert code == 2 and "3D models" in err


def test_3d_weights_round_trip_through_the_bundle(tmp_path: Path) -> None:
    """weights.pt keeps the family, its config and the authors' keys; the torch runner reads it back."""
    from attunet_deploy import load_runner

    _oktay(tmp_path / "ck.pth", "grid_attention")
    code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), "--roi", "16x32x32")
    assert code == 0, err
    saved = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    assert saved["family"] == "oktay3d" and saved["config"]["variant"] == "grid_attention"
    assert "attentionblock2.theta.weight" in saved["state_dict"]
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 40, 24)).astype(np.float32)
    with load_runner(tmp_path / "b", backend="torch") as t, load_runner(tmp_path / "b", backend="ort") as o:
        a, c = t.infer_volume(x), o.infer_volume(x)
    assert np.linalg.norm(a - c) / np.linalg.norm(a) <= 1e-5


def test_bench_times_whole_volumes_through_the_window(tmp_path: Path) -> None:
    """bench --volume: seconds per volume and windows per second, from the bundle's sliding window."""
    _oktay(tmp_path / "ck.pth", "multi_att_dsv")
    code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), "--roi", "32x32x32")
    assert code == 0, err
    code, out, err = run("bench", "-b", str(tmp_path / "b"), "--backend", "ort", "--volume", "1x1x40x70x60",
                         "--iterations", "2", "--json", "-")
    assert code == 0, err
    (row,) = json.loads(out)["results"]
    assert row["mode"] == "volume" and row["shape"] == [1, 1, 40, 70, 60]
    assert row["windows"] == 2 * 4 * 3  # starts per axis: (0, 8); (0, 16, 32, 38); (0, 16, 28)
    assert row["volume_seconds"] > 0 and row["windows_per_s"] == pytest.approx(24 / row["volume_seconds"])
    code, _, err = run("bench", "-b", str(tmp_path / "b"), "--volume", "1x1x40x70x60", "--shape", "1x1x32x32x32")
    assert code == 2 and "--volume" in err
    code, _, err = run("bench", "-b", str(tmp_path / "b"), "--volume", "1x1x3000x512x512")  # 3 GB: refused unallocated
    assert code == 2 and "ATTDEPLOY_MAX_IMAGE_FILE_MB" in err


def test_save_diff_shows_the_worst_axial_slice_of_each_volume(tmp_path: Path) -> None:
    from PIL import Image

    from attunet_deploy.judge.panels import GAP, MIN_TILE

    _oktay(tmp_path / "ck.pth", "grid_attention")
    code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), "--roi", "16x32x32")
    assert code == 0, err
    code, _, err = run("verify", "-b", str(tmp_path / "b"), "--backend", "ort", "--precision", "fp32",
                       "--save-diff", str(tmp_path / "diff"))
    assert code == 0, err
    pictures = sorted((tmp_path / "diff" / "ort-fp32").glob("*.png"))
    assert pictures and all("-z" in p.name for p in pictures)
    golden = Bundle.load(tmp_path / "b").manifest["artifacts"]["golden.npz"]["shapes"]
    in_plane = {tuple(s[3:]) for s in golden}
    for p in pictures:  # four tiles of one axial slice, upscaled by a whole factor (nearest-neighbour)
        with Image.open(p) as im:
            tile = (im.width - 3 * GAP) // 4
            assert im.mode == "RGB" and tile >= MIN_TILE
            assert any(tile % w == 0 and im.height == h * (tile // w) for h, w in in_plane)


def test_2d_only_commands_refuse_a_3d_bundle_and_write_nothing(tmp_path: Path) -> None:
    """predict on image files handles slices: on a 3D bundle it says so (exit 2) rather than run every
    slice as a one-slice volume. (predict --dicom-seg, serve-dicom and triton take 3D bundles:
    tests/system/test_dicom_node_3d.py, tests/system/test_triton_3d.py.)"""
    _oktay(tmp_path / "ck.pth", "grid_attention")
    code, _, err = run("export", str(tmp_path / "ck.pth"), "-o", str(tmp_path / "b"), "--roi", "16x32x32")
    assert code == 0, err
    np.save(tmp_path / "v.npy", np.zeros((8, 32, 32), np.float32))
    b = str(tmp_path / "b")
    for args in (["predict", "-b", b, str(tmp_path / "v.npy"), "-o", str(tmp_path / "o1")],):
        code, _, err = run(*args)
        if code == 2 and ("needs" in err and "pip install" in err):
            continue  # an optional extra missing on this machine: refused before the bundle is looked at
        assert code == 2 and "takes 2D bundles" in err, (args[0], err)
    assert not (tmp_path / "o1").exists()
