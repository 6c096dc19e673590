"""Bundle -> Triton Inference Server model repository (``attdeploy triton``).

Writes, for a bundle:

- ``attunet_<precision>/``: the ONNX graph on Triton's onnxruntime backend (``onnxruntime_onnx``),
  input ``image`` [C,-1,-1], output ``logits`` [K,-1,-1], dynamic batching, an instance group;
  optionally ONNX Runtime's TensorRT accelerator, strongly typed (precision comes from the graph);
- ``attunet_trt_<precision>/``: the TensorRT engine (``tensorrt_plan``) when the bundle has one
  built on this GPU with this TensorRT, with the engine's optimization profiles;
- ``attunet_pre`` / ``attunet_post`` (python backend): normalisation + pad, crop + mask, by the
  package's Segmenter (shipped beside their model.py);
- ``attunet_segment``: an ensemble raw image -> uint8 mask;
- ``attunet_cpu`` (python backend): ``model.onnx`` on ONNX Runtime inside Triton, for servers
  that only have the python backend;
- 3D bundles: 5-D configs, and ``attunet_volume`` (python backend, BLS) instead of the 2D
  pre/post/ensemble: a whole raw volume (and its spacing) in, the uint8 mask out, windows served by
  ``attunet_cpu`` (``--kind cpu``) or the first precision's ONNX/TensorRT model (``--kind gpu``);
- ``README.md`` with the ``docker run`` line for NVIDIA's tritonserver image.

Every ``config.pbtxt`` is parsed with Triton's own schema (``tritonclient``'s
``model_config_pb2``, protobuf text format) before anything is written; the repository is
written to a staging folder and moved into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, TypedDict

from attunet_deploy.bundle import ONNX_FILES, Bundle
from attunet_deploy.console import Reporter
from attunet_deploy.errors import InputError
from attunet_deploy.fileio import dir_lock, short_name

MARKER = ".attdeploy-triton"


class TritonModel(TypedDict):
    """One model of the repository: its config.pbtxt text and its files (relative path -> a source
    file to copy, or the bytes to write)."""

    config: str
    files: dict[str, Path | bytes]
MODELS_SRC = Path(__file__).with_name("triton_models")

ONNX_TEMPLATE = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {k}, {sp} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
{accelerator}parameters {{ key: "attunet_deploy.graph_sha256" value: {{ string_value: "{sha}" }} }}
"""

TRT_ACCELERATOR = """optimization {{ execution_accelerators {{ gpu_execution_accelerator: [ {{
  name: "tensorrt"
  parameters {{ key: "precision_mode" value: "FP32" }}
  parameters {{ key: "trt_engine_cache_enable" value: "1" }}
  parameters {{ key: "trt_engine_cache_path" value: "{cache}" }}
  parameters {{ key: "trt_timing_cache_enable" value: "1" }}
  parameters {{ key: "trt_timing_cache_path" value: "{cache}" }}
}} ] }} }}
"""

PLAN_TEMPLATE = """name: "{name}"
platform: "tensorrt_plan"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {k}, {sp} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_GPU profile: [ {profiles} ] }} ]
parameters {{ key: "attunet_deploy.engine" value: {{ string_value: "{engine}" }} }}
"""

PRE_TEMPLATE = """name: "attunet_pre"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "raw" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }} ]
output [ {{ name: "image" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }},
         {{ name: "size" data_type: TYPE_INT32 dims: [ 2 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "spec" value: {{ string_value: {spec} }} }}
"""

POST_TEMPLATE = """name: "attunet_post"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {k}, {sp} ] }},
        {{ name: "size" data_type: TYPE_INT32 dims: [ 2 ] }} ]
output [ {{ name: "mask" data_type: TYPE_UINT8 dims: [ -1, -1 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "spec" value: {{ string_value: {spec} }} }}
"""

CPU_TEMPLATE = """name: "attunet_cpu"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {k}, {sp} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "graph" value: {{ string_value: "model.onnx" }} }}
parameters {{ key: "intra_op_threads" value: {{ string_value: "{threads}" }} }}
"""

VOLUME_TEMPLATE = """name: "attunet_volume"
backend: "python"
max_batch_size: 0
input [ {{ name: "volume" data_type: TYPE_FP32 dims: [ {vdims} ] }},
        {{ name: "spacing" data_type: TYPE_FP32 dims: [ 3 ] optional: true }} ]
output [ {{ name: "mask" data_type: TYPE_UINT8 dims: [ -1, -1, -1 ] }} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "inference_model" value: {{ string_value: "{infer}" }} }}
parameters {{ key: "spec" value: {{ string_value: {spec} }} }}
"""

#: The package's numpy-only modules the python models run (shipped beside their model.py), so that the
#: served mask chain is the in-process Segmenter.
LIBRARY = ("errors.py", "limits.py", "preprocess.py", "window.py", "segmenter.py", "bundle/spec.py")
PACKAGE_SRC = Path(__file__).resolve().parents[1]

ENSEMBLE_TEMPLATE = """name: "attunet_segment"
platform: "ensemble"
max_batch_size: {max_batch}
input [ {{ name: "raw" data_type: TYPE_FP32 dims: [ {c}, {sp} ] }} ]
output [ {{ name: "mask" data_type: TYPE_UINT8 dims: [ -1, -1 ] }} ]
ensemble_scheduling {{ step [
  {{ model_name: "attunet_pre" model_version: -1
     input_map {{ key: "raw" value: "raw" }}
     output_map {{ key: "image" value: "padded" }}
     output_map {{ key: "size" value: "size" }} }},
  {{ model_name: "{infer}" model_version: -1
     input_map {{ key: "image" value: "padded" }}
     output_map {{ key: "logits" value: "logits" }} }},
  {{ model_name: "attunet_post" model_version: -1
     input_map {{ key: "logits" value: "logits" }}
     input_map {{ key: "size" value: "size" }}
     output_map {{ key: "mask" value: "mask" }} }}
] }}
"""


def check_config(text: str, name: str) -> Any:
    """Parse ``text`` with Triton's ModelConfig schema; InputError naming the model if it fails."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise InputError("'attdeploy triton' checks configs with tritonclient: pip install "
                         "'attunet-deploy[triton]'") from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(f"internal: the config.pbtxt of {name} does not parse with Triton's schema: {exc}") from exc


def _pbtxt_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid protobuf text string literal


def plan_repository(bundle: Bundle, precisions: list[str], *, max_batch: int = 8, instances: int = 1,
                    kind: str = "gpu", tensorrt_accelerator: bool = False, delay_us: int = 2000
                    ) -> dict[str, TritonModel]:
    """model name -> {"config": pbtxt text, "files": {relative path: source path or bytes}}."""
    if not 1 <= max_batch <= 1024:
        raise InputError("--max-batch must be in 1..1024")
    if not 1 <= instances <= 64:
        raise InputError("--instances must be in 1..64")
    if kind not in ("gpu", "cpu"):
        raise InputError("--kind must be gpu or cpu")
    if tensorrt_accelerator and kind != "gpu":
        raise InputError("--tensorrt-accelerator needs --kind gpu")
    c, k = bundle.in_channels, bundle.out_channels
    sp = ", ".join(["-1"] * bundle.spatial_dims)
    common = {"c": c, "k": k, "sp": sp, "max_batch": max_batch, "instances": instances, "delay_us": delay_us}
    models: dict[str, TritonModel] = {}
    for precision in precisions:
        graph = ONNX_FILES[precision]
        bundle.require(graph)
        name = f"attunet_{precision}"
        sha = bundle.sha256(graph) or ""
        accel = TRT_ACCELERATOR.format(cache=f"/models/{name}/trt_cache_{sha[:12]}") if tensorrt_accelerator else ""
        models[name] = {"config": ONNX_TEMPLATE.format(name=name, kind=f"KIND_{kind.upper()}", accelerator=accel,
                                                       sha=sha, **common),
                        "files": {"1/model.onnx": bundle.path(graph)}}
        engine = _engine_here(bundle, precision)
        if engine is not None:
            entry = bundle.artifacts[engine].extra
            profiles = ", ".join(f'"{i}"' for i in range(len(entry["profiles"])))
            batch = min(max_batch, min(int(p["max"][0]) for p in entry["profiles"]))
            models[f"attunet_trt_{precision}"] = {
                "config": PLAN_TEMPLATE.format(name=f"attunet_trt_{precision}", profiles=profiles, engine=engine,
                                               **{**common, "max_batch": batch}),
                "files": {"1/model.plan": bundle.path(engine)}}
    models["attunet_cpu"] = {"config": CPU_TEMPLATE.format(threads=0, **common),
                             "files": {"1/model.onnx": bundle.path(ONNX_FILES["fp32"]),
                                       "1/model.py": MODELS_SRC / "cpu.py"}}
    if bundle.spatial_dims == 3:
        infer = "attunet_cpu" if kind == "cpu" else next(
            n for n in (f"attunet_trt_{precisions[0]}", f"attunet_{precisions[0]}") if n in models)
        models["attunet_volume"] = _volume_model(bundle, infer, instances)
        for name, model in models.items():
            check_config(model["config"], name)
        return models
    spec = _pbtxt_string(json.dumps(bundle.spec.to_dict()))
    models["attunet_pre"] = {"config": PRE_TEMPLATE.format(spec=spec, **common),
                             "files": {"1/model.py": MODELS_SRC / "pre.py", **_library()}}
    models["attunet_post"] = {"config": POST_TEMPLATE.format(spec=spec, **common),
                              "files": {"1/model.py": MODELS_SRC / "post.py", **_library()}}
    infer = "attunet_cpu" if kind == "cpu" else f"attunet_{precisions[0]}"
    models["attunet_segment"] = {"config": ENSEMBLE_TEMPLATE.format(infer=infer, **common),
                                 "files": {"1/.keep": b""}}
    for name, model in models.items():
        check_config(model["config"], name)
    return models


def _library() -> dict[str, Path | bytes]:
    """The Segmenter and what it imports, as files of a python model's version folder."""
    stub = b'"""The numpy modules of attunet-deploy a python model runs (copied by attdeploy triton)."""\n'
    files: dict[str, Path | bytes] = {"1/attunet_deploy/__init__.py": stub, "1/attunet_deploy/bundle/__init__.py": b""}
    files.update({f"1/attunet_deploy/{rel}": PACKAGE_SRC / rel for rel in LIBRARY})
    return files


def _volume_model(bundle: Bundle, infer: str, instances: int) -> TritonModel:
    """``attunet_volume``: whole raw volumes through the bundle's sliding window, windows served by ``infer``."""
    vdims = "-1, -1, -1" if bundle.in_channels == 1 else f"{bundle.in_channels}, -1, -1, -1"
    return {"config": VOLUME_TEMPLATE.format(vdims=vdims, instances=instances, infer=infer,
                                             spec=_pbtxt_string(json.dumps(bundle.spec.to_dict()))),
            "files": {"1/model.py": MODELS_SRC / "volume.py", **_library()}}


def _engine_here(bundle: Bundle, precision: str) -> str | None:
    from attunet_deploy.environment import gpu_identity, tensorrt_probe
    from attunet_deploy.runtimes.tensorrt import find_engine

    probe = tensorrt_probe()
    if not probe.available:
        return None
    name, _ = find_engine(bundle, precision, gpu_identity(), probe.version)
    return name


def readme(models: list[str], kind: str) -> str:
    return f"""# Triton model repository written by attunet-deploy

Models: {", ".join(models)}.

Serve it with NVIDIA's Triton image (onnxruntime, tensorrt and python backends):

```bash
docker run --rm {"--gpus all " if kind == "gpu" else ""}-p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v "$PWD":/models nvcr.io/nvidia/tritonserver:25.10-py3 \\
  tritonserver --model-repository=/models
```

(run it in this folder; the TensorRT accelerator's engine cache paths assume it is mounted at /models).

- `attunet_<precision>`: input `image` float32 [N, C, H, W] with H and W multiples of 16, output `logits`.
- `attunet_segment`: input `raw` float32 [N, C, H, W] of any size, output `mask` uint8 [N, H, W]
  (normalisation, padding, cropping and thresholding inside Triton).
- `attunet_cpu` runs `model.onnx` with ONNX Runtime in the python backend: for servers without the
  onnxruntime backend; its python environment needs `numpy` and `onnxruntime`.
- 3D bundles: `attunet_<precision>` and `attunet_cpu` take windows [N, C, D, H, W]; `attunet_volume`
  takes a whole raw volume `volume` float32 [D, H, W] and optional `spacing` float32 [3] (z, y, x mm)
  and returns `mask` uint8 [D, H, W]: normalisation, resampling, the sliding window (each batch of
  windows sent to the inference model by a BLS request) and thresholding inside Triton, with the same
  numpy code as the in-process `segment_volume` (copied beside its model.py). `attunet_pre`,
  `attunet_post` and `attunet_segment` are 2D-only and not written for 3D bundles.

Check the served model against the bundle's golden set:

```bash
attdeploy verify -b BUNDLE --backend triton --triton-url localhost:8000 --triton-model attunet_fp32
```
"""


def _written_before(target: Path) -> set[str] | None:
    """The files (relative paths) the marker says this command wrote into ``target`` (None: no
    readable marker). A marker from before the file list counts its models' folders, README.md and itself."""
    from attunet_deploy import limits

    try:
        data = json.loads(limits.read_bounded(target / MARKER, limits.MANIFEST, "repository marker"))
    except (InputError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    files = data.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files) | {MARKER}
    models = data.get("models")
    if not isinstance(models, list):
        return None
    return {p.relative_to(target).as_posix() for m in models if isinstance(m, str) and (target / m).is_dir()
            for p in (target / m).rglob("*") if p.is_file()} | {"README.md", MARKER}


def _check_repository_target(target: Path, out: str | os.PathLike[str]) -> None:
    """-o is new, empty, or a repository this command wrote whose every file it wrote: anything
    else in it (a user's notes, another model) would be deleted by the swap, so it is refused."""
    if not target.exists():
        return
    if not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file()):
        raise InputError(f"-o {out} exists and is not a repository written by 'attdeploy triton': choose a new or "
                         "empty folder")
    if not any(target.iterdir()):
        return
    ours = _written_before(target)
    if ours is None:
        raise InputError(f"-o {out}: its {MARKER} marker is unreadable: choose a new or empty folder")
    # Triton's python backend leaves __pycache__ beside each model.py: derived, not the user's
    foreign = sorted(rel for p in target.rglob("*") if (p.is_file() or p.is_symlink())
                     and (rel := p.relative_to(target).as_posix()) not in ours and "__pycache__" not in p.parts)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"-o {out} holds {shown}, which 'attdeploy triton' did not write and would delete: move "
                         "them out, or choose another -o")


def write_repository(bundle: Bundle, out: str | os.PathLike[str], precisions: list[str], *, max_batch: int = 8,
                     instances: int = 1, kind: str = "gpu", tensorrt_accelerator: bool = False,
                     reporter: Reporter | None = None) -> list[str]:
    """Write the repository to ``out`` (a new or empty folder, or one this command wrote before);
    returns the model names. Staged beside ``out`` and moved into place whole."""
    from attunet_deploy.outputs import check_output

    reporter = reporter or Reporter()
    target = check_output(out, "-o", kind="dir", bundles=[bundle.root])
    _check_repository_target(target, out)
    models = plan_repository(bundle, precisions, max_batch=max_batch, instances=instances, kind=kind,
                             tensorrt_accelerator=tensorrt_accelerator)
    staging = target.parent / f".{short_name(target.name)}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, model in models.items():
            folder = staging / name
            folder.mkdir(parents=True)
            (folder / "config.pbtxt").write_text(model["config"], encoding="utf-8")
            for rel, src in model["files"].items():
                dst = folder / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(src, bytes):
                    dst.write_bytes(src)
                else:
                    shutil.copyfile(src, dst)
        (staging / "README.md").write_text(readme(list(models), kind), encoding="utf-8")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        (staging / MARKER).write_text(json.dumps({"bundle": str(bundle.root), "models": list(models),
                                                  "files": files}) + "\n")
        # Two writers of one repository take turns for the swap (a flock on the parent folder):
        # each swap is whole, the last one wins, and neither sees the other's half-moved folder.
        with dir_lock(target.parent):
            _check_repository_target(target, out)
            if target.exists():
                old = target.parent / f".{short_name(target.name)}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    reporter.info(f"wrote {len(models)} models to {target}")
    return list(models)
