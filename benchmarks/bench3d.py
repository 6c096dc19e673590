"""The 3D demo in run_benchmarks.py: one sliding window, and one whole CT volume.

- Window: 1x1x32x48x48 (the demo's roi) on every CPU backend and precision, and OpenVINO bf16 of
  the FP32 graph beside OpenVINO's default 16-bit row; interleaved (bench.bench_runners).
- Volume: a 200x512x512 CT phantom at 2.5 x 0.78 x 0.78 mm, the size and spacing of an abdominal
  CT. Seconds per volume are timed two ways, rounds interleaved across backends:
  ``sliding_window_s``: the model-space volume (resampled to the demo's 5 x 6 x 6 mm: 100x67x67)
  through the sliding window: our numpy sliding window for ORT/OpenVINO, MONAI's
  ``sliding_window_inference`` around the PyTorch model for torch (same roi, overlap, Gaussian
  blending, windows per call);
  ``end_to_end_s``: ``segment_volume(raw HU, spacing)``: normalise, resample, sliding window,
  resample back, threshold: what a user's call costs.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.judge.bench import BenchSettings, bench_runners, peak_rss_mb, volume_windows
from attunet_deploy.runtimes.select import open_runner

#: The whole volume: slices, rows, columns, and its spacing (z, y, x) in mm.
CT_SIZE = (200, 512, 512)
CT_SPACING = (2.5, 0.78125, 0.78125)
WINDOW_ROWS = [("torch", "fp32", {}), ("ort", "fp32", {}), ("ort", "fp16", {}), ("ort", "int8", {}),
               ("ov", "fp32", {}), ("ov", "fp16", {}), ("ov", "fp16", {"hint": "bf16"}), ("ov", "int8", {})]
VOLUME_ROWS = [("ort", "fp32", {}), ("ort", "int8", {}), ("ov", "fp32", {}), ("ov", "int8", {}),
               ("ov", "fp16", {"hint": "bf16"})]


def demo3d_bundle(path: Path, reporter: Any) -> Bundle:
    """The 3D demo exported and quantised (made on the first run, reused after)."""
    from attunet_deploy.demo import DEMO3D_WEIGHTS
    from attunet_deploy.steps.export import ExportSettings, export_bundle
    from attunet_deploy.steps.quantize import QuantizeSettings, quantize_bundle

    if not (path / "manifest.json").exists():
        export_bundle(ExportSettings(DEMO3D_WEIGHTS, path), reporter=reporter)
        quantize_bundle(Bundle.load(path), QuantizeSettings(verify=False), reporter=reporter)
    return Bundle.load(path)


def _runners(bundle: Bundle, rows: list[tuple[str, str, dict[str, Any]]], threads: int) -> list[Any]:
    """Activated runners of ``rows``; each carries ``label`` (backend/precision, bf16 for OpenVINO's bf16 row)."""
    out = []
    for backend, precision, options in rows:
        try:
            # spinning off: ONNX Runtime's idle threads would otherwise steal the cores from the runner
            # timed next (measured here: OpenVINO FP32 40.7 ms per window after ORT with spinning, 19.6 without)
            runner = open_runner(bundle, backend, precision, threads=threads, spinning=False, **options)
            runner.activate()
            runner.label = f"{backend}/{options.get('hint', precision)}"
        except Exception as exc:  # an unavailable backend is a row left out, said so
            print(f"skipped {backend}/{precision} {options or ''}: {exc}")
            continue
        out.append(runner)
    return out


def bench_window(bundle: Bundle, threads: int, iterations: int, reporter: Any) -> list[dict[str, Any]]:
    """Every (backend, precision) at one window, interleaved."""
    assert bundle.sliding_window is not None
    roi = bundle.sliding_window.roi
    runners = _runners(bundle, WINDOW_ROWS, threads)
    settings = BenchSettings(shape=(1, 1, *roi), warmup=3, iterations=iterations, threads=threads)
    results = [r.to_dict() for r in bench_runners(runners, settings, reporter)]
    for r in runners:
        r.deactivate()
    for r in results:
        r["model"] = "3D demo (oktay3d, one window)"
    return results


class _MonaiTorch:
    """The PyTorch model through MONAI's sliding_window_inference (the torch row of the volume)."""

    label = "torch/fp32"

    def __init__(self, bundle: Bundle, threads: int) -> None:
        import torch

        from attunet_deploy.runtimes.torch_runner import TorchRunner

        torch.set_num_threads(threads)
        self.runner = TorchRunner(bundle, "fp32")
        self.runner.activate()
        self.window = bundle.sliding_window

    def sliding_window(self, x: np.ndarray) -> np.ndarray:
        import torch
        from monai.inferers import sliding_window_inference

        model = self.runner._module  # the reference module the torch runner holds
        with torch.inference_mode():
            out = sliding_window_inference(torch.from_numpy(x), roi_size=self.window.roi,
                                           sw_batch_size=self.window.batch, predictor=model,
                                           overlap=self.window.overlap, mode=self.window.mode,
                                           sigma_scale=self.window.sigma_scale)
        return out.numpy()


def bench_volume(bundle: Bundle, threads: int, rounds: int) -> list[dict[str, Any]]:
    """Seconds per whole CT volume, rounds interleaved across backends (median per backend)."""
    from attunet_deploy.demo.phantom3d import make_volume
    from attunet_deploy.environment import machine_info
    from attunet_deploy.segmenter import Segmenter

    hu, _ = make_volume(2026, CT_SIZE)
    seg = Segmenter(bundle.spec)
    x = seg.to_model_grid(seg.prepare(hu), CT_SPACING)
    window = bundle.sliding_window
    assert window is not None
    windows = volume_windows(x.shape[2:], window)
    runners: list[Any] = _runners(bundle, VOLUME_ROWS, threads)
    try:
        runners.insert(0, _MonaiTorch(bundle, threads))
    except ImportError as exc:
        print(f"skipped torch with MONAI: {exc}")
    sw: dict[str, list[float]] = {r.label: [] for r in runners}
    e2e: dict[str, list[float]] = {r.label: [] for r in runners}
    for rnd in range(rounds + 1):  # round 0 warms up (compilation, caches)
        for r in runners:
            gc.collect()
            t0 = time.perf_counter()
            r.sliding_window(x) if isinstance(r, _MonaiTorch) else r.infer_volume(x)
            t1 = time.perf_counter()
            if not isinstance(r, _MonaiTorch):
                r.segment_volume(hu, spacing=CT_SPACING)
            t2 = time.perf_counter()
            if rnd:
                sw[r.label].append(t1 - t0)
                if not isinstance(r, _MonaiTorch):
                    e2e[r.label].append(t2 - t1)
            print(f"round {rnd} {r.label}: sliding window {t1 - t0:.2f} s"
                  + ("" if isinstance(r, _MonaiTorch) else f", end to end {t2 - t1:.2f} s"), flush=True)
    out = []
    for r in runners:
        backend, precision = r.label.split("/")
        s = float(np.median(sw[r.label]))
        out.append({"model": "3D demo (oktay3d, whole volume)", "backend": backend, "precision": precision,
                    "device": r.runner.device if isinstance(r, _MonaiTorch) else r.device,
                    "name": r.label + (" (MONAI sliding window)" if isinstance(r, _MonaiTorch) else ""),
                    "raw_shape": list(CT_SIZE), "raw_spacing_mm": list(CT_SPACING),
                    "model_space_shape": list(x.shape), "windows": windows, "rounds": rounds,
                    "sliding_window_s": s, "windows_per_s": windows / s,
                    "end_to_end_s": float(np.median(e2e[r.label])) if e2e[r.label] else None,
                    "peak_rss_mb": peak_rss_mb(), "machine": machine_info()})
    for r in runners:
        (r.runner if isinstance(r, _MonaiTorch) else r).deactivate()
    return out


def markdown(window_rows: list[dict[str, Any]], volume_rows: list[dict[str, Any]]) -> list[str]:
    """The 3D section of results.md."""
    from attunet_deploy.judge.report import markdown_table

    base = next((r for r in window_rows if r["backend"] == "ort" and r["precision"] == "fp32"), None)
    rows = [[r["backend"], r["precision"], r.get("device", ""), f"{r['latency_ms']['p50']:.1f}",
             f"{r['latency_ms']['p90']:.1f}", f"{100 * r['cov']:.1f}",
             f"{r['latency_ms']['p50'] / base['latency_ms']['p50']:.2f}x" if base else "-"] for r in window_rows]
    vbase = next((r for r in volume_rows if r["backend"] == "ort" and r["precision"] == "fp32"), None)
    vrows = [[r["name"], r["device"], f"{r['sliding_window_s']:.2f}", f"{r['windows_per_s']:.1f}",
              f"{r['end_to_end_s']:.2f}" if r["end_to_end_s"] is not None else "-",
              f"{r['sliding_window_s'] / vbase['sliding_window_s']:.2f}x" if vbase else "-"] for r in volume_rows]
    v0 = volume_rows[0] if volume_rows else {}
    return ["## 3D demo (oktay3d, feature_scale 16)", "",
            f"One window {'x'.join(map(str, window_rows[0]['shape'])) if window_rows else '-'}, p50 ms per call:", "",
            markdown_table(["backend", "precision", "device", "p50 ms", "p90 ms", "CoV %", "vs ORT FP32"], rows), "",
            f"One whole volume {'x'.join(map(str, v0.get('raw_shape', [])))} at "
            f"{' x '.join(f'{s:g}' for s in v0.get('raw_spacing_mm', []))} mm "
            f"(model space {'x'.join(map(str, v0.get('model_space_shape', [])))}, {v0.get('windows', '-')} windows), "
            f"median of {v0.get('rounds', '-')} interleaved rounds:", "",
            markdown_table(["backend", "device", "sliding window s", "windows/s", "end to end s", "vs ORT FP32"],
                           vrows), ""]
