"""Backends judged on the user's own images and ground truth.

The data set is what a user has: a CT series as DICOM files (int16, RescaleIntercept -1024),
masks as 8-bit PNGs, and a checkpoint in the popular AttU_Net layout (the demo weights renamed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from popular import to_popular_layout

from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main
from attunet_deploy.demo import DEMO_WEIGHTS
from attunet_deploy.io.holdout import split_holdout

pytest.importorskip("pydicom")
from PIL import Image

from attunet_deploy.demo.ctseries import write_ct_series


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    return result.exit_code, result.stdout, result.stderr


def one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


def write_masks(slices: list, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in slices:
        Image.fromarray((s.label * 255).astype(np.uint8)).save(folder / (s.path.stem + ".png"))


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user")
    ckpt = root / "ck.pth"
    sd = torch.load(DEMO_WEIGHTS, weights_only=True)["state_dict"]
    torch.save(to_popular_layout(sd, head="Conv_1x1"), ckpt)
    slices = write_ct_series(root / "dcm", 40, (128, 128), seed=11)
    write_masks(slices, root / "masks")
    other = write_ct_series(root / "other_dcm", 6, (128, 128), seed=12, name="img_{:02d}.dcm")
    write_masks(other, root / "other_masks")
    return {"root": root, "ckpt": ckpt, "dcm": root / "dcm", "masks": root / "masks",
            "other_dcm": root / "other_dcm", "other_masks": root / "other_masks"}


@pytest.fixture(scope="module")
def user_bundle(user_data: dict[str, Path]) -> Path:
    out = user_data["root"] / "b"
    code, _, err = run("pipeline", str(user_data["ckpt"]), "--calib", str(user_data["dcm"]), "--labels",
                       str(user_data["masks"]), "--normalize", "ct-window:40,400", "-o", str(out),
                       "--bench-iterations", "2", "--shape", "1x1x128x128")
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------ split
def test_split_is_deterministic_disjoint_and_about_a_quarter(tmp_path: Path) -> None:
    a = tmp_path / "a"
    for i in range(40):
        (a / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (a / f"sub{i % 3}" / f"s{i:02d}.npy").write_bytes(b"x")
    files = sorted(p for p in a.rglob("*.npy"))
    gold, calib = split_holdout(files, a)
    assert len(gold) == 10 and not set(gold) & set(calib) and set(gold) | set(calib) == set(files)
    # the same folder elsewhere, listed in another order: the same relative names are held out
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b)
    gold_b, _ = split_holdout(sorted(b.rglob("*.npy"), reverse=True), b)
    assert sorted(p.relative_to(b) for p in gold_b) == sorted(p.relative_to(a) for p in gold)
    assert len(split_holdout(files[:2], a)[0]) == 1  # at least one
    many = [a / f"m{i}.npy" for i in range(400)]
    assert len(split_holdout(many, a)[0]) == 32  # at most 32


# ------------------------------------------------------------------------------ acceptance
def test_pipeline_holds_out_a_quarter_and_judges_against_truth(user_bundle: Path, user_data: dict[str, Path]) -> None:
    m = json.loads((user_bundle / "manifest.json").read_text())
    golden = m["golden"]
    assert golden["kind"] == "user-images" and golden["labels"] is True
    held = {s["file"] for s in golden["source"]}
    assert len(held) == 10 and all(f.endswith(".dcm") for f in held)
    for s in golden["source"]:
        assert len(s["sha256"]) == 64 and s["shape"] == [1, 128, 128]
    assert golden["synthetic_cases"] == 1  # 128x128 only: one non-divisible crop added
    calib = m["artifacts"]["model.int8.onnx"]["producer"]["calibration_files"]
    assert len(calib) == 30 and not held & set(calib)
    code, out, err = run("verify", "-b", str(user_bundle), "--json", "-")
    assert code == 0, err
    rows = {(r["backend"], r["precision"]): r for r in json.loads(out)["results"]}
    for key in (("torch", "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8")):
        r = rows[key]
        assert r["status"] == "pass" and r["reference"] == "torch/fp32"
        assert 0.5 < r["gt_dice"] <= 1.0 and abs(r["gt_dice_drop"]) < 0.05
        assert len(r["worst_images"]) == 3 and all({"file", "dice"} <= set(w) for w in r["worst_images"])
    assert rows[("ort", "fp32")]["gt_dice_drop"] == pytest.approx(0.0, abs=1e-6)
    code, out, _ = run("info", "-b", str(user_bundle))
    assert code == 0 and "held-out file(s)" in out and "with ground-truth labels" in out
    report = (user_bundle / "report.md").read_text()
    assert "Dice vs truth" in report and "held-out" in report


def test_verify_images_without_torch_uses_ort_reference(user_bundle: Path, user_data: dict[str, Path]) -> None:
    from test_without_torch import BLOCK_TORCH

    block = BLOCK_TORCH + "from attunet_deploy.cli import main\nmain(sys.argv[1:])\n"
    proc = subprocess.run([sys.executable, "-c", block, "verify", "-b", str(user_bundle), "--images",
                           str(user_data["other_dcm"]), "--labels", str(user_data["other_masks"]), "--json", "-"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["results"]
    ran = [r for r in rows if r["status"] != "unavailable"]
    assert {("ort", "fp32"), ("ort", "fp16"), ("ort", "int8")} <= {(r["backend"], r["precision"]) for r in ran}
    for r in ran:
        assert r["reference"] == "ort/fp32" and r["images"] == 6 and 0.5 < r["gt_dice"] <= 1.0
    assert next(r for r in rows if r["backend"] == "torch")["status"] == "unavailable"


def test_verify_images_leaves_the_bundle_unchanged(user_bundle: Path, user_data: dict[str, Path]) -> None:
    before = (user_bundle / "manifest.json").read_bytes()
    code, out, err = run("verify", "-b", str(user_bundle), "--images", str(user_data["other_dcm"]),
                         "--backend", "torch", "--backend", "ort", "--precision", "fp32", "--json", "-")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert all(r["reference"] == "torch/fp32" for r in rows) and "gt_dice" not in rows[0]
    assert (user_bundle / "manifest.json").read_bytes() == before


def test_calibration_never_uses_a_golden_image_from_another_folder(user_bundle: Path,
                                                                    user_data: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """--calib in another folder that holds copies of golden images: they are excluded by content."""
    b = tmp_path / "b"
    shutil.copytree(user_bundle, b)
    copy = tmp_path / "copies"
    shutil.copytree(user_data["dcm"], copy / "renamed")
    held = [s["file"] for s in json.loads((b / "manifest.json").read_text())["golden"]["source"]]
    for i, name in enumerate(held):  # golden files under new names too
        shutil.copy(user_data["dcm"] / name, copy / f"golden_copy_{i}.dcm")
    code, _, err = run("quantize", "-b", str(b), "--calib", str(copy), "--precision", "int8", "--no-verify")
    assert code == 0, err
    entry = Bundle.load(b).manifest["artifacts"]["model.int8.onnx"]["producer"]
    assert entry["calibration_images"] == 30
    assert not any(f.startswith("golden_copy") for f in entry["calibration_files"])
    assert "excluded" in entry["calibration"]


# ------------------------------------------------------------------------------ label errors
@pytest.mark.parametrize("case", ["image without label", "label without image", "shape mismatch", "bad class"])
def test_label_matching_errors_name_the_file(user_data: dict[str, Path], tmp_path: Path, case: str) -> None:
    masks = tmp_path / "masks"
    shutil.copytree(user_data["masks"], masks)
    if case == "image without label":
        (masks / "slice_007.png").unlink()
        match = "slice_007"
    elif case == "label without image":
        Image.fromarray(np.zeros((128, 128), np.uint8)).save(masks / "slice_999.png")
        match = "slice_999.png has no image"
    elif case == "shape mismatch":
        Image.fromarray(np.zeros((100, 128), np.uint8)).save(masks / "slice_003.png")
        match = "slice_003"
    else:
        np.save(masks / "extra.npy", np.zeros(3))
        match = "extra.npy has no image"
    out = tmp_path / "b"
    code, _, err = run("export", str(user_data["ckpt"]), "-o", str(out), "--images", str(user_data["dcm"]),
                       "--labels", str(masks), "--normalize", "ct-window:40,400")
    one_line_error(code, err, match)
    assert not out.exists()


def test_labels_need_images(user_data: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("export", str(user_data["ckpt"]), "-o", str(tmp_path / "b"), "--labels",
                       str(user_data["masks"]))
    one_line_error(code, err, "--labels: labels need the images they belong to")


# ------------------------------------------------------------------------------ dice-drop gate
def test_max_dice_drop_gates_a_damaged_int8_graph(user_bundle: Path, user_data: dict[str, Path],
                                                  tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(user_bundle, b)
    dark = tmp_path / "dark"
    dark.mkdir()
    np.save(dark / "air.npy", np.full((4, 1, 128, 128), -1000.0, np.float32))  # calibrating on air: useless scales
    code, _, err = run("quantize", "-b", str(b), "--calib", str(dark), "--precision", "int8", "--method", "minmax",
                       "--no-verify")
    assert code == 0, err
    args = ["verify", "-b", str(b), "--backend", "ort", "--precision", "int8", "--mean-dice", "int8=none",
            "--worst-dice", "int8=none", "--json", "-"]
    code, out, err = run(*args, "--max-dice-drop", "0.02")
    assert code == 1, err
    (row,) = json.loads(out)["results"]
    assert row["status"] == "fail" and row["gt_dice_drop"] > 0.02 and "Dice vs truth drops" in row["reason"]
    code, out, _ = run(*args, "--max-dice-drop", "1")
    assert code == 0
    one_line_error(*run("verify", "-b", str(b), "--max-dice-drop", "nan")[::2], "--max-dice-drop")
    one_line_error(*run("verify", "-b", str(b), "--images", str(user_data["other_dcm"]), "--max-dice-drop",
                        "0.1")[::2], "needs ground truth")


# ------------------------------------------------------------------------------ diff pictures
def test_save_diff_writes_readable_panels_and_a_legend(user_bundle: Path, user_data: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from attunet_deploy.judge.panels import GAP, MIN_TILE

    out = tmp_path / "diff"
    code, _, err = run("verify", "-b", str(user_bundle), "--backend", "ort", "--precision", "fp16",
                       "--precision", "int8", "--save-diff", str(out))
    assert code == 0, err
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 6 and {p.split("/")[0] for p in pngs} == {"ort-fp16", "ort-int8"}
    legend = (out / "report.md").read_text()
    assert "orange" in legend and "sky blue" in legend and "missed" in legend and "ort-int8/" in legend
    for name in pngs:  # the report's panel renderer: four tiles of the same size, each >= 384 px
        img = np.asarray(Image.open(out / name).convert("RGB"))
        tile = (img.shape[1] - 3 * GAP) // 4
        assert tile >= MIN_TILE and img.shape[1] == 4 * tile + 3 * GAP
        assert np.array_equal(img[:, :tile].std(axis=-1) > 0, np.zeros(img[:, :tile].shape[:2], bool))  # grey input
    code, _, err = run("verify", "-b", str(user_bundle), "--backend", "ort", "--save-diff", str(out))
    one_line_error(code, err, "new or empty folder")
