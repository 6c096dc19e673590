"""FP16 / INT8 graphs: structure TensorRT can consume, gates kept in float, accuracy on the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

from attunet_deploy import load_runner
from attunet_deploy.build.onnx import float_nodes
from attunet_deploy.bundle import Bundle
from attunet_deploy.cli import main
from attunet_deploy.judge.verify import verify
from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_fp16_graph_keeps_float32_io(demo_bundle: Path) -> None:
    model = onnx.load(str(demo_bundle / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in model.graph.initializer}
    assert all(inits[c.input[1]].data_type == TensorProto.FLOAT16 for c in convs)
    for node in model.graph.node:
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in inits:
            assert inits[node.input[2]].data_type == TensorProto.FLOAT  # scales stay float32


def test_int8_graph_is_tensorrt_style_qdq_with_float_gates(demo_bundle: Path) -> None:
    model = onnx.load(str(demo_bundle / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    prod = _producers(model)
    kept = set(float_nodes(demo_bundle / "model.onnx"))
    assert len(kept) == 5  # four psi convs + the head
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    quantized = {name for name, n in convs.items() if prod.get(n.input[1]) is not None
                 and prod[n.input[1]].op_type == "DequantizeLinear"}
    assert kept.isdisjoint(quantized) and len(quantized) == len(convs) - 5
    for node in model.graph.node:
        if node.op_type == "Sigmoid":
            assert prod[node.input[0]].op_type != "DequantizeLinear"
    meta = Bundle.load(demo_bundle).manifest["artifacts"]["model.int8.onnx"]
    assert meta["precision"] == "int8" and "demo phantoms" in meta["producer"]["calibration"]
    assert meta["trt_lint"] == []


def test_demo_accuracy_gates(demo_bundle: Path, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "demo"
    shutil.copytree(demo_bundle, b)
    rows = {(r.backend, r.precision): r.to_dict() for r in verify(Bundle.load(b), ["ort"], ["all"])}
    fp16, int8 = rows[("ort", "fp16")], rows[("ort", "int8")]
    assert rows[("ort", "fp32")]["status"] == "pass"
    assert fp16["status"] == "pass" and fp16["mean_dice"] >= 0.995 and fp16["rel_l2"] <= 1e-2
    assert int8["status"] == "pass" and int8["mean_dice"] >= 0.98 and int8["worst_dice"] >= 0.95
    for r in rows.values():
        assert r["gt_dice"] >= 0.85  # against the phantoms' ground truth
    result = CliRunner().invoke(main, ["verify", "-b", str(b), "--backend", "ort", "--precision", "int8",
                                       "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads((tmp_path / "v.json").read_text())["results"]
    assert row["status"] == "pass" and "gt_dice" in row


def test_demo_heldout_dice(demo_bundle: Path) -> None:
    """The committed demo weights reach Dice >= 0.85 on 200 held-out phantoms (FP32)."""
    from attunet_deploy.demo import HELDOUT_SEED, make_phantoms
    from attunet_deploy.metrics import dice

    hu, labels = make_phantoms(200, seed=HELDOUT_SEED)
    with load_runner(demo_bundle, backend="ort") as runner:
        masks = np.concatenate([runner.segment(hu[i:i + 50]) for i in range(0, 200, 50)])
    scores = [dice(m, lab) for m, lab in zip(masks, labels)]
    assert np.mean(scores) >= 0.85


def test_quantize_all_quantizes_gates(bundle_copy: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((3, 1, 48, 48), dtype=np.float32))
    quantize_bundle(Bundle.load(bundle_copy), QuantizeSettings(calib=str(tmp_path / "c.npy"), precisions=("int8",),
                                                               quantize_all=True, verify=False))
    model = onnx.load(str(bundle_copy / "model.int8.onnx"))
    prod = _producers(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(prod[c.input[1]].op_type == "DequantizeLinear" for c in convs)


@pytest.mark.parametrize("source", ["dicom", "png"])
def test_calibration_from_dicom_and_png(bundle_copy: Path, tmp_path: Path, source: str) -> None:
    if source == "dicom":
        pytest.importorskip("pydicom")
        from pydicom.data import get_testdata_file

        calib = get_testdata_file("CT_small.dcm")
    else:
        from PIL import Image

        calib = tmp_path / "pngs"
        calib.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (60 + 8 * i, 70), dtype=np.uint8)).save(calib / f"{i}.png")
    result = CliRunner().invoke(main, ["quantize", "-b", str(bundle_copy), "--calib", str(calib),
                                       "--method", "minmax", "--precision", "int8", "--no-verify"])
    assert result.exit_code == 0, result.stderr  # random weights: accuracy is not checked here
    entry = Bundle.load(bundle_copy).manifest["artifacts"]["model.int8.onnx"]
    expected = 1 if source == "dicom" else 3
    assert entry["producer"]["calibration_images"] == expected
    assert entry["producer"]["calibration_files"] == (["CT_small.dcm"] if source == "dicom"
                                                      else ["0.png", "1.png", "2.png"])


def test_full_range_weights_stay_correct_on_this_cpu(demo_bundle: Path, tmp_path: Path) -> None:
    """8-bit weights saturate ONNX Runtime's default int8 path on x86 without VNNI; the ort runner
    must then switch to the exact path, so verification still passes on every CPU."""
    import shutil

    from attunet_deploy.environment import cpu_has_int8_dot
    from attunet_deploy.runtimes.onnxruntime import OrtCpuRunner

    b = tmp_path / "demo"
    shutil.copytree(demo_bundle, b)
    quantize_bundle(Bundle.load(b), QuantizeSettings(precisions=("int8",), full_range_weights=True, verify=False))
    bundle = Bundle.load(b)
    assert bundle.manifest["artifacts"]["model.int8.onnx"]["producer"]["weight_bits"] == 8
    assert OrtCpuRunner(bundle, "int8")._needs_exact_int8() is (not cpu_has_int8_dot())
    (row,) = verify(bundle, ["ort"], ["int8"])
    assert row.status == "pass" and (row.mean_dice or 0) >= 0.98, row


def test_fp16_keep_fp32_nodes(bundle_copy: Path) -> None:
    """A node kept in FP32 runs between casts, and the graph still matches the reference."""
    from attunet_deploy.errors import InputError

    src = onnx.load(str(bundle_copy / "model.onnx"))
    first_conv = next(n.name for n in src.graph.node if n.op_type == "Conv")
    quantize_bundle(Bundle.load(bundle_copy), QuantizeSettings(precisions=("fp16",), fp16_keep_fp32=(first_conv,),
                                                               verify=False))
    model = onnx.load(str(bundle_copy / "model.fp16.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == first_conv)
    assert inits[node.input[1]].data_type == TensorProto.FLOAT  # its weights stayed float32
    prod = _producers(model)
    assert prod[node.input[0]].op_type == "Cast"  # activation cast up to float32
    fp16 = Bundle.load(bundle_copy).manifest["artifacts"]["model.fp16.onnx"]
    assert fp16["producer"]["kept_fp32_nodes"] == [first_conv]
    (row,) = verify(Bundle.load(bundle_copy), ["ort"], ["fp16"])
    assert row.status == "pass", row
    with pytest.raises(InputError, match="no node named nope"):
        quantize_bundle(Bundle.load(bundle_copy), QuantizeSettings(precisions=("fp16",), fp16_keep_fp32=("nope",),
                                                                   verify=False))
