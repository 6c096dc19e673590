"""Checkpoint -> bundle: reference weights, ONNX with dynamic N/H/W, golden set, manifest.

The bundle is written into a staging directory beside the target and moved into place only
when complete, so an interrupted export leaves the previous bundle (or nothing) behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import GOLDEN_FILE, ONNX_FILES, TORCHSCRIPT_FILE, WEIGHTS_FILE, Bundle, check_output_dir, commit_staged
from ..console import Reporter
from ..environment import versions
from ..errors import InputError, VerificationFailed
from ..fileio import atomic_path, sha256_file
from ..preprocess import crop, default_postprocessing, pad_to_divisor, parse_normalization

DEFAULT_OPSET = 18
#: opsets the exporter and TensorRT's parser both handle well for this model.
SUPPORTED_OPSETS = range(13, 22)
#: ONNX Runtime must reproduce PyTorch this closely right after export.
EXPORT_REL_L2 = 1e-5
#: (N, H, W) of the golden cases for user models: batch 1 and 2, one size not divisible by 16.
GENERIC_GOLDEN = ((1, 128, 128), (2, 96, 160), (1, 90, 75))
#: Demo golden cases: phantoms at the training size, a taller size, and a non-divisible size.
DEMO_GOLDEN = ((8, 128, 128), (2, 160, 128), (4, 100, 120))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters log many lines (missing torchvision ops, deprecations) that mean nothing here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


def export_onnx(module: Any, in_channels: int, path: Path, opset: int = DEFAULT_OPSET,
                exporter: str = "auto") -> dict[str, Any]:
    """Write a self-contained ONNX graph: input ``image`` [N,C,H,W], output ``logits``, N/H/W dynamic.

    ``exporter``: "dynamo" (torch.export), "torchscript" (the legacy tracer) or "auto" (dynamo,
    falling back to torchscript; TorchScript modules always use the legacy path).
    """
    import onnx
    import torch

    if opset not in SUPPORTED_OPSETS:
        raise InputError(f"--opset {opset} unsupported: choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    sample = torch.zeros(2, in_channels, 64, 64)
    scripted = isinstance(module, torch.jit.ScriptModule)
    order = ["torchscript"] if scripted else (["dynamo", "torchscript"] if exporter == "auto" else [exporter])
    errors: list[str] = []
    used = None
    with atomic_path(path) as tmp, _quiet_exporter():
        for kind in order:
            try:
                if kind == "dynamo":
                    from torch.export import Dim

                    n, hk, wk = Dim("N", min=1, max=4096), Dim("hk", min=1, max=1024), Dim("wk", min=1, max=1024)
                    program = torch.onnx.export(module, (sample,), input_names=["image"], output_names=["logits"],
                                                dynamo=True, opset_version=opset, verbose=False,
                                                dynamic_shapes={"x": {0: n, 2: 16 * hk, 3: 16 * wk}})
                    program.save(str(tmp), external_data=False)
                else:
                    torch.onnx.export(module, (sample,), str(tmp), input_names=["image"], output_names=["logits"],
                                      dynamo=False, opset_version=opset, do_constant_folding=True,
                                      dynamic_axes={"image": {0: "N", 2: "H", 3: "W"},
                                                    "logits": {0: "N", 2: "H", 3: "W"}})
                used = kind
                break
            except Exception as exc:
                errors.append(f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")
        if used is None:
            raise InputError("ONNX export failed: " + " | ".join(errors))
        model = onnx.load(str(tmp))
        _name_dynamic_axes(model)
        model.producer_name = "attunet-deploy"
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(tmp))  # one file: far below the 2 GB external-data limit
    return {"exporter": used, "opset": opset, "fallback_reasons": errors}


def _name_dynamic_axes(model: Any) -> None:
    """Give graph I/O the dim names N, H, W (the dynamo exporter writes 'N', '16*hk', '16*wk')."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("N", None, "H", "W")):
            if name is not None:
                dim.ClearField("dim_value")
                dim.dim_param = name


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Store key/value metadata (config, divisor, preprocessing) in the ONNX file itself."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def reference_logits(module: Any, x: np.ndarray, divisor: int) -> np.ndarray:
    """PyTorch FP32 logits with the same pad-and-crop the runners apply."""
    import torch

    xp, size = pad_to_divisor(x, divisor)
    with torch.inference_mode():
        y = module(torch.from_numpy(xp)).float().numpy()
    return crop(y, size)


def golden_inputs(in_channels: int, preprocessing: dict[str, Any], demo: bool
                  ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(model-space inputs, labels or None) for each golden case."""
    from ..preprocess import normalize

    cases: list[tuple[np.ndarray, np.ndarray | None]] = []
    if demo:
        from ..demo import GOLDEN_SEED, make_phantoms

        for i, (n, h, w) in enumerate(DEMO_GOLDEN):
            hu, labels = make_phantoms(n, seed=GOLDEN_SEED * 100 + i, size=(h, w))
            cases.append((normalize(hu, preprocessing), labels))
        return cases
    rng = np.random.default_rng(20260101)
    kind = preprocessing.get("normalize", {}).get("kind", "none")
    for n, h, w in GENERIC_GOLDEN:
        # Smooth random fields: closer to images than white noise, so masks have structure.
        coarse = rng.standard_normal((n, in_channels, h // 8 + 2, w // 8 + 2)).astype(np.float32)
        field = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :h, :w]
        field = field + 0.3 * rng.standard_normal(field.shape).astype(np.float32)
        if kind in ("ct_window", "scale", "minmax"):
            field = 1.0 / (1.0 + np.exp(-field))  # these normalisations produce [0, 1]
        cases.append((np.ascontiguousarray(field, dtype=np.float32), None))
    return cases


def _remove_stale_staging(out: Path) -> None:
    """Delete staging directories left by exports of ``out`` that were killed (owner not alive)."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def export_bundle(model_path: str | os.PathLike[str] | None, out: str | os.PathLike[str] = "deploy", *,
                  opset: int = DEFAULT_OPSET, trust_pickle: bool = False, force: bool = False,
                  normalize: str | None = None, exporter: str = "auto", check_rel_l2: float = EXPORT_REL_L2,
                  reporter: Reporter | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Export ``model_path`` (None: the bundled demo) to a verified bundle at ``out``.

    Returns the bundle and its ONNX Runtime parity row. Raises VerificationFailed (after the
    bundle is in place, so it can be inspected) when ONNX Runtime differs from PyTorch by
    more than ``check_rel_l2`` (default 1e-5) in relative L2.
    """
    import torch

    from ..checkpoint import load_checkpoint, save_checkpoint
    from ..demo import DEMO_NORMALIZE, DEMO_WEIGHTS, is_demo
    from ..model import SPATIAL_DIVISOR, count_parameters
    from ..verify import Tolerance, load_golden, run_backend

    reporter = reporter or Reporter()
    out = Path(out)
    mode = check_output_dir(out, force)  # refuse a foreign directory before doing any work
    demo = model_path is None or is_demo(model_path)
    src = Path(model_path) if model_path is not None else DEMO_WEIGHTS
    if demo and not src.is_file():
        raise InputError(f"demo weights missing at {src}: reinstall attunet-deploy or run "
                         "'python -m attunet_deploy.demo.train'")
    preprocessing = parse_normalization(normalize if normalize is not None else (DEMO_NORMALIZE if demo else None))

    with reporter.step(f"Loading {src.name}"):
        loaded = load_checkpoint(src, trust_pickle=trust_pickle)
    for note in loaded.notes:
        reporter.notice("note:", note)
    config = loaded.config
    if preprocessing["normalize"]["kind"] == "mean_std":
        n_mean = len(preprocessing["normalize"]["mean"])
        if n_mean not in (1, config.in_channels):
            raise InputError(f"--normalize gives {n_mean} means for a {config.in_channels}-channel model")

    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        source = {"path": str(src.resolve()), "sha256": sha256_file(src), "layout": loaded.source,
                  "demo": demo, "parameters": count_parameters(loaded.module)}
        bundle = Bundle.new(staging, config=config.to_dict(), preprocessing=preprocessing,
                            postprocessing=default_postprocessing(config.out_channels), source=source,
                            spatial_divisor=SPATIAL_DIVISOR)
        producer = versions(include_torch=True)
        if loaded.is_reference:
            with bundle.writing(WEIGHTS_FILE) as tmp:
                save_checkpoint(loaded.module, tmp, meta={"source": src.name})
            bundle.add_artifact(WEIGHTS_FILE, kind="pytorch-weights", precision="fp32", producer=producer)
        else:
            scripted = loaded.module if isinstance(loaded.module, torch.jit.ScriptModule) else \
                torch.jit.trace(loaded.module, torch.zeros(1, config.in_channels, 64, 64))
            with bundle.writing(TORCHSCRIPT_FILE) as tmp:
                torch.jit.save(scripted, str(tmp))
            bundle.add_artifact(TORCHSCRIPT_FILE, kind="torchscript", precision="fp32", producer=producer)

        onnx_path = staging / ONNX_FILES["fp32"]
        with reporter.step(f"Exporting ONNX (opset {opset}, dynamic N/H/W)"):
            info = export_onnx(loaded.module, config.in_channels, onnx_path, opset=opset, exporter=exporter)
            add_metadata(onnx_path, {"attunet_deploy.config": json.dumps(config.to_dict()),
                                     "attunet_deploy.spatial_divisor": str(SPATIAL_DIVISOR),
                                     "attunet_deploy.preprocessing": json.dumps(preprocessing)})
        if info["fallback_reasons"]:
            reporter.notice("note:", f"used the {info['exporter']} exporter ({'; '.join(info['fallback_reasons'])})")
        from .trt_lint import lint_onnx

        lint = lint_onnx(onnx_path)
        if lint:
            reporter.notice("TensorRT lint (fp32):", "; ".join(lint[:5]))
        bundle.add_artifact(ONNX_FILES["fp32"], kind="onnx", precision="fp32",
                            producer={**producer, "exporter": info["exporter"], "opset": opset}, trt_lint=lint)

        cases = golden_inputs(config.in_channels, preprocessing, demo)
        with reporter.progress("Computing PyTorch FP32 golden outputs", len(cases)) as advance:
            arrays: dict[str, np.ndarray] = {}
            for i, (x, labels) in enumerate(cases):
                arrays[f"case{i}_input"] = x
                arrays[f"case{i}_logits"] = reference_logits(loaded.module, x, SPATIAL_DIVISOR)
                if labels is not None:
                    arrays[f"case{i}_labels"] = labels
                advance()
        with bundle.writing(GOLDEN_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        bundle.add_artifact(GOLDEN_FILE, kind="golden", producer=producer,
                            shapes=[list(arrays[f"case{i}_input"].shape) for i in range(len(cases))])

        with reporter.step("Checking ONNX Runtime CPU against PyTorch"):
            row = run_backend(bundle, "ort", "fp32", load_golden(bundle), Tolerance(rel_l2=check_rel_l2))
        bundle.record_verification([row])
        bundle.save()
        commit_staged(staging, out, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bundle = Bundle.load(out)
    if row["status"] != "pass":
        raise VerificationFailed(f"ONNX Runtime differs from PyTorch: {row.get('reason') or row['status']} (the "
                                 "bundle was written; --check-rel-l2 sets the export check's tolerance)")
    return bundle, row
