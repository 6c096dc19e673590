"""Every path that turns images into masks gives the Segmenter's masks, byte for byte, on the demo:
``Runner.segment`` and ``segment_volume``, predict's stream, the DICOM series path, quantize's Dice
gate, NNCF's validation function and the Triton python models (pre/post, volume). The reference
each path is held to is ``Segmenter(bundle.spec)`` over a bare ONNX Runtime session."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from attunet_deploy import load_runner
from attunet_deploy.bundle import Bundle
from attunet_deploy.demo import make_phantoms
from attunet_deploy.metrics import per_image_overlap
from attunet_deploy.segmenter import Segmenter


def _session(bundle: Bundle, precision: str = "fp32") -> Any:
    from attunet_deploy.bundle import ONNX_FILES

    sess = ort.InferenceSession(bundle.read_artifact(ONNX_FILES[precision]), providers=["CPUExecutionProvider"])
    return lambda xp: sess.run(None, {"image": xp})[0]


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    hu, _ = make_phantoms(5, seed=404, size=(100, 131))  # H and W multiples of nothing: padding matters
    return hu


def test_runner_segment(demo_bundle: Path, raw: np.ndarray) -> None:
    b = Bundle.load(demo_bundle)
    want = Segmenter(b.spec).segment(_session(b), raw)
    with load_runner(b, "ort", "fp32") as r:
        got = r.segment(raw)
        streamed = np.concatenate(list(r.segment_many([raw[:2], raw[2:]])))
    assert got.dtype == np.uint8 and np.array_equal(got, want) and np.array_equal(streamed, want)
    assert 0 < want.mean() < 0.5  # the phantoms' organs: neither empty nor full


def test_predict_stream(demo_bundle: Path, raw: np.ndarray, tmp_path: Path) -> None:
    from attunet_deploy.apps.predict import predict_files

    b = Bundle.load(demo_bundle)
    for i in range(3):
        np.save(tmp_path / f"img{i}.npy", raw[i, 0])
    rows = predict_files(b, [str(tmp_path / f"img{i}.npy") for i in range(3)], tmp_path / "out", backend="ort",
                         overlay=False)
    want = Segmenter(b.spec).segment(_session(b), raw[:3])
    for i, row in enumerate(rows):
        assert np.array_equal(np.load(row.mask), want[i])


def test_dicom_series_path(demo_bundle: Path, raw: np.ndarray) -> None:
    from attunet_deploy.apps.dicom.series import segment_slices

    b = Bundle.load(demo_bundle)
    hu = raw[:, 0]
    with load_runner(b, "ort", "fp32") as r:
        got = segment_slices(r, hu, batch=2)
    assert np.array_equal(got, Segmenter(b.spec).segment(_session(b), raw))


def test_quantize_dice_gate_and_nncf_validation(demo_bundle: Path) -> None:
    from attunet_deploy.build.ov_int8 import DiceTarget
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, compare
    from attunet_deploy.steps.quantize import evaluate_int8

    b = Bundle.load(demo_bundle)
    seg = Segmenter(b.spec)
    cases = load_golden(b)
    run = _session(b, "int8")
    outs = [seg.infer(run, c.inputs) for c in cases]
    want = compare(outs, cases, seg, DEFAULT_TOLERANCES["int8"]).mean_dice
    dice, _ = evaluate_int8(b.path("model.int8.onnx"), cases, seg)
    assert dice == want
    # NNCF's validation function, given a "compiled model" that runs the same graph
    images = [seg.pad(np.ascontiguousarray(c.inputs[i:i + 1])) for c in cases for i in range(len(c.inputs))]
    refs = [seg.masks(c.logits[i:i + 1]) for c in cases for i in range(len(c.inputs))]
    target = DiceTarget(images, refs, seg, 0.01)
    mean, per = target.validate(lambda x: {"logits": run(x)}, range(len(images)))
    masks = [seg.masks(o[i:i + 1]) for o in outs for i in range(len(o))]
    expect = [per_image_overlap(m, r, 2)[0][0] for m, r in zip(masks, refs)]
    assert per == pytest.approx(expect, abs=0) and mean == pytest.approx(float(np.mean(expect)), abs=1e-15)


class _Tensor:
    def __init__(self, name: str, data: np.ndarray) -> None:
        self.name, self.data = name, np.asarray(data)

    def as_numpy(self) -> np.ndarray:
        return self.data


class _Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.outputs = {t.name: t for t in output_tensors or []}
        self.error = error


def _triton_stub(infer: Any) -> types.ModuleType:
    """A stand-in for Triton's python-backend module: requests and responses as plain objects, and
    BLS requests answered by ``infer`` (tests *our* model code; tests/system runs the real server)."""
    pb = types.ModuleType("triton_python_backend_utils")

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[_Tensor]) -> None:
            self.inputs = inputs

        def exec(self) -> Any:
            out = _Response([_Tensor("logits", infer(self.inputs[0].data))])
            out.has_error = lambda: False  # type: ignore[attr-defined]
            return out

    pb.Tensor = _Tensor  # type: ignore[attr-defined]
    pb.InferenceResponse = _Response  # type: ignore[attr-defined]
    pb.InferenceRequest = InferenceRequest  # type: ignore[attr-defined]
    pb.TritonError = str  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = lambda r, name: r.inputs.get(name)  # type: ignore[attr-defined]
    pb.get_output_tensor_by_name = lambda r, name: r.outputs.get(name)  # type: ignore[attr-defined]
    return pb


def _repository(bundle: Bundle, tmp_path: Path) -> Path:
    from attunet_deploy.steps.triton_repo import write_repository

    repo = tmp_path / "repo"
    write_repository(bundle, repo, ["fp32"], kind="cpu")
    return repo


def _served_model(repo: Path, name: str, monkeypatch: pytest.MonkeyPatch, infer: Any) -> Any:
    """The python model ``name`` of a repository ``attdeploy triton`` wrote, initialised from its own
    folder and config: it imports the attunet_deploy copy shipped beside it, as inside Triton."""
    import importlib.util
    import json

    from google.protobuf import json_format

    from attunet_deploy.steps.triton_repo import check_config

    config = json_format.MessageToDict(check_config((repo / name / "config.pbtxt").read_text(), name),
                                       preserving_proto_field_name=True)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _triton_stub(infer))
    ours = [m for m in sys.modules if m == "attunet_deploy" or m.startswith("attunet_deploy.")]
    saved, path = {m: sys.modules.pop(m) for m in ours}, list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"served_{name}", repo / name / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name),
                          "model_version": "1"})
        shipped = sys.modules["attunet_deploy.segmenter"].__file__
        assert shipped is not None and str(repo / name / "1") in shipped  # the shipped copy ran, not ours
    finally:
        for m in [m for m in sys.modules if m == "attunet_deploy" or m.startswith("attunet_deploy.")]:
            del sys.modules[m]
        sys.modules.update(saved)
        sys.path[:] = path
    return model


def test_triton_pre_and_post_models(demo_bundle: Path, raw: np.ndarray, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    b = Bundle.load(demo_bundle)
    run = _session(b)
    want = Segmenter(b.spec).segment(run, raw)
    repo = _repository(b, tmp_path)
    pre = _served_model(repo, "attunet_pre", monkeypatch, run)
    post = _served_model(repo, "attunet_post", monkeypatch, run)
    (resp,) = pre.execute([_Request(raw=raw.astype(np.float32))])
    image, size = resp.outputs["image"].data, resp.outputs["size"].data
    assert image.shape[-2] % 16 == 0 and image.shape[-1] % 16 == 0 and size.tolist() == [[100, 131]] * 5
    (out,) = post.execute([_Request(logits=run(image), size=size)])
    assert np.array_equal(out.outputs["mask"].data, want)


@pytest.fixture(scope="module")
def demo3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.steps.export import ExportSettings, export_bundle

    out = tmp_path_factory.mktemp("demo3d") / "b"
    export_bundle(ExportSettings(DEMO3D_WEIGHTS, out))
    return out


def test_segment_volume_and_the_triton_volume_model(demo3d: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from attunet_deploy.demo.phantom3d import make_volume

    b = Bundle.load(demo3d)
    run = _session(b)
    hu = make_volume(77, (41, 79, 83))[0]  # at 4 x 4.8 x 4.5 mm: resampled to the model's 5 x 6 x 6, and back
    spacing = (4.0, 4.8, 4.5)
    want = Segmenter(b.spec).segment_volume(run, hu, spacing)
    with load_runner(b, "ort", "fp32") as r:
        assert np.array_equal(r.segment_volume(hu, spacing=spacing), want)
    vol = _served_model(_repository(b, tmp_path), "attunet_volume", monkeypatch, run)
    (resp,) = vol.execute([_Request(volume=hu.astype(np.float32), spacing=np.asarray(spacing, np.float32))])
    assert np.array_equal(resp.outputs["mask"].data, want) and want.shape == hu.shape and want.any()
