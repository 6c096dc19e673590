"""ov/int8 against the peer an Intel user would pick: OpenVINO running NNCF's default INT8 of the
same FP32 graph, from the same calibration inputs, with the same threads, in one interleaved run.

    python benchmarks/nncf_peer.py [--models demo full] [--iterations 60] [--out benchmarks/results]

The peer is what NNCF's documentation shows: ``nncf.quantize(model, nncf.Dataset(inputs))`` (default
preset, no ignored scope), the result compiled with ``core.compile_model(model, "CPU")`` and only
the thread count set. Ours is ``load_runner(bundle, "ov", "int8")``: the bundle's own INT8 artifact
as ``attdeploy`` runs it. Both get model-space inputs (no I/O, no normalisation) and are timed
round-robin, call for call. Accuracy: mean and worst Dice of each against the PyTorch FP32 masks
on the bundle's golden set (for the full-size model, whose weights are random, rel L2 only).

Models: ``demo`` (the bundled demo, 1x1x256x256) and ``full`` (in 3 / out 1 / base 64 with
BatchNorm statistics from phantoms, 1x3x256x256; made by run_benchmarks.py's recipe, reused
from benchmarks/results/bundle when present). Writes nncf_peer.json and nncf_peer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attunet_deploy import load_runner  # noqa: E402
from attunet_deploy.bundle import OV_INT8_XML, Bundle  # noqa: E402
from attunet_deploy.console import RichReporter  # noqa: E402
from attunet_deploy.environment import machine_info, module_version, versions  # noqa: E402


def nncf_default(src: Path, inputs: list[np.ndarray]) -> Any:
    """NNCF's default INT8 of the FP32 ONNX graph (what its documentation shows)."""
    import logging

    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = ov.Core().read_model(str(src))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs))


class PeerRunner:
    """The peer as a user runs it: compile with the thread count, infer on one request."""

    def __init__(self, model: Any, threads: int) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.array(next(iter(self.request.infer({0: x}).values())), copy=True)

    def infer_any_size(self, x: np.ndarray) -> np.ndarray:
        """The golden set has sizes the network cannot take as they are: padded up to 16 and cropped
        back exactly as every attdeploy runner does (same padded bytes in, same crop out)."""
        from attunet_deploy.preprocess import pad_to_divisor

        xp, (h, w) = pad_to_divisor(np.ascontiguousarray(x, np.float32), (16, 16))
        return self.infer(xp)[..., :h, :w]


def interleaved(fns: dict[str, Any], x: np.ndarray, warmup: int, iterations: int) -> dict[str, dict[str, float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iterations):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append(1000.0 * (time.perf_counter() - t0))
    return {k: {"p50": statistics.median(v), "p90": float(np.percentile(v, 90)), "min": min(v)}
            for k, v in times.items()}


def accuracy(bundle: Bundle, infer: Any, judge_dice: bool) -> dict[str, float]:
    from attunet_deploy.io.golden import load_golden
    from attunet_deploy.judge.verify import DEFAULT_TOLERANCES, compare
    from attunet_deploy.segmenter import Segmenter

    cases = load_golden(bundle)
    outputs = [infer(c.inputs) for c in cases]
    row = compare(outputs, cases, Segmenter(bundle.spec), DEFAULT_TOLERANCES["int8"])
    out = {"rel_l2": row.metric("rel_l2")}
    if judge_dice:
        out.update(mean_dice=row.metric("mean_dice"), worst_dice=row.metric("worst_dice"))
    return out


def full_bundle(path: Path, calib: Path, reporter: Any) -> Bundle:
    """The full-size bundle (run_benchmarks.py's recipe), with quantize's NNCF INT8 IR added."""
    from run_benchmarks import realistic_checkpoint

    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, calibration_inputs, quantize_bundle

    if not (path / "manifest.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "full.pt"
            realistic_checkpoint(ckpt)
            export_bundle(ExportSettings(ckpt, path, check_rel_l2=1e-4), reporter=reporter)
            quantize_bundle(Bundle.load(path), QuantizeSettings(calib=str(calib), max_samples=32, verify=False),
                            reporter=reporter)
    bundle = Bundle.load(path)
    if not bundle.has(OV_INT8_XML):
        _add_ov_int8(bundle, calibration_inputs(bundle, str(calib), 32)[0], reporter)
    return Bundle.load(path)


def _add_ov_int8(bundle: Bundle, inputs: list[np.ndarray], reporter: Any) -> None:
    """quantize's NNCF stage (same function, same ignored scope) without its Dice gate: the
    full-size model has random weights, so its masks are noise and only its speed is measured."""
    from attunet_deploy.build.ov_int8 import quantize_openvino
    from attunet_deploy.bundle import OV_INT8_BIN, ArtifactKind

    ignored = list(bundle.artifacts["model.int8.onnx"]["producer"].get("float_nodes", []))
    with bundle.transaction() as txn, reporter.step("Full-size model: NNCF INT8 IR (quantize's recipe)"):
        info = quantize_openvino(bundle.onnx_path("fp32"), txn.stage(OV_INT8_XML), txn.stage(OV_INT8_BIN), inputs,
                                 ignored)
        txn.add_artifact(OV_INT8_XML, kind=ArtifactKind.OPENVINO_IR, precision="int8",
                         producer={**versions(), **info, "weights": OV_INT8_BIN, "note": "benchmark: no Dice gate"})
        txn.add_artifact(OV_INT8_BIN, kind=ArtifactKind.OPENVINO_WEIGHTS, precision="int8")
        txn.commit()


def run_model(name: str, bundle: Bundle, calib: str | None, max_samples: int, args: argparse.Namespace,
              reporter: Any) -> dict[str, Any]:
    from attunet_deploy.steps.quantize import calibration_inputs

    if not bundle.has(OV_INT8_XML):
        raise SystemExit(f"{bundle.root} has no {OV_INT8_XML}: re-run quantize with OpenVINO and NNCF installed")
    threads = os.cpu_count() or 1
    inputs, described, _ = calibration_inputs(bundle, calib, max_samples)
    with reporter.step(f"{name}: NNCF default INT8 from the same {len(inputs)} calibration inputs"):
        peer = PeerRunner(nncf_default(bundle.onnx_path("fp32"), inputs), threads)
    shape = (1, bundle.in_channels, 256, 256)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with load_runner(bundle, backend="ov", precision="int8", threads=threads) as ours, \
            load_runner(bundle, backend="ov", precision="fp32", threads=threads) as fp32:
        with reporter.step(f"{name}: timing at {'x'.join(map(str, shape))}, interleaved"):
            timing = interleaved({"ours": ours.infer, "nncf_default": peer.infer, "ov_fp32": fp32.infer}, x,
                                 args.warmup, args.iterations)
        acc = {"ours": accuracy(bundle, ours.infer, name == "demo"),
               "nncf_default": accuracy(bundle, peer.infer_any_size, name == "demo")}
        device = ours.device
    return {"model": name, "shape": list(shape), "threads": threads, "calibration": described,
            "ours_device": device, "timing_ms": timing, "accuracy": acc,
            "ratio_ours_vs_peer": timing["ours"]["p50"] / timing["nncf_default"]["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["demo", "full"], default=["demo", "full"])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--demo-bundle", type=Path, default=ROOT / "benchmarks" / "results" / "demo_bundle")
    parser.add_argument("--bundle", type=Path, default=ROOT / "benchmarks" / "results" / "bundle")
    args = parser.parse_args()
    from run_benchmarks import demo_bundle

    reporter = RichReporter()
    records = []
    for name in args.models:
        if name == "demo":
            records.append(run_model(name, demo_bundle(args.demo_bundle, reporter), None, 64, args, reporter))
        else:
            from attunet_deploy.demo import make_phantoms, window

            with tempfile.TemporaryDirectory() as tmp:
                calib = Path(tmp) / "calib.npy"
                hu, _ = make_phantoms(32, seed=7, size=(256, 256))
                np.save(calib, np.repeat(window(hu), 3, axis=1))
                records.append(run_model(name, full_bundle(args.bundle, calib, reporter), str(calib), 32, args,
                                         reporter))
    mach = machine_info()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": mach, "versions": versions(),
            "openvino": module_version("openvino"), "nncf": module_version("nncf")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nncf_peer.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    lines = [f"# ov/int8 against NNCF's default INT8 on OpenVINO ({meta['date']})", "",
             f"Machine: {mach['cpu_model']}, {mach['cores']} cores, ISA {' '.join(mach['isa']) or '-'}; "
             f"OpenVINO {meta['openvino']}, NNCF {meta['nncf']}. Medians of one interleaved run.", "",
             "| model | shape | ours p50 ms | NNCF default p50 ms | ours / NNCF | OV FP32 p50 ms "
             "| ours Dice mean/worst | NNCF Dice mean/worst | ours rel L2 | NNCF rel L2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        t, a = r["timing_ms"], r["accuracy"]

        def dice(k: str, a: dict[str, Any] = a) -> str:
            return f"{a[k]['mean_dice']:.4f} / {a[k]['worst_dice']:.4f}" if "mean_dice" in a[k] else "-"

        lines.append(f"| {r['model']} | {'x'.join(map(str, r['shape']))} | {t['ours']['p50']:.2f} | "
                     f"{t['nncf_default']['p50']:.2f} | {r['ratio_ours_vs_peer']:.3f} | {t['ov_fp32']['p50']:.2f} | "
                     f"{dice('ours')} | {dice('nncf_default')} | {a['ours']['rel_l2']:.4f} | "
                     f"{a['nncf_default']['rel_l2']:.4f} |")
    (args.out / "nncf_peer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
