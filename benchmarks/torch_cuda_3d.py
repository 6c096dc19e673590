"""The 3D demo on a CUDA GPU with PyTorch: parity with the CPU and seconds per CT volume.

    python benchmarks/torch_cuda_3d.py [--json benchmarks/results/torch_cuda_3d.json]

Loads the bundled 3D demo checkpoint (the paper's unet_CT_multi_att_dsv_3D, feature_scale 16),
runs phantom windows through it on the CPU (FP32, the reference) and on CUDA in FP32 and FP16
(autocast), and reports relative L2 and mask Dice against the CPU (also with PyTorch's default TF32
convolutions, which the torch runner turns off on CUDA); then times one 32x48x48 window
(CUDA events, p50 of 50) and one whole 200x512x512 CT phantom at 2.5 x 0.78 x 0.78 mm through this
project's numpy sliding window with the CUDA model as predictor (the same code ``segment_volume``
runs), end to end and its parts. Needs only torch and numpy: on a GPU machine that lacks the
package's runtime dependencies (onnx, onnxruntime, rich, ...), the package's torch-free modules are
imported without running its ``__init__``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
try:
    import attunet_deploy  # noqa: F401
except ImportError as exc:  # a bare GPU image: the modules used here need torch and numpy only
    print(f"note: {exc}; importing the package's modules without its __init__", flush=True)
    pkg = types.ModuleType("attunet_deploy")
    pkg.__path__ = [str(ROOT / "attunet_deploy")]
    sys.modules["attunet_deploy"] = pkg

from attunet_deploy.bundle.spec import Normalization, SlidingWindow  # noqa: E402
from attunet_deploy.demo import DEMO3D_WEIGHTS  # noqa: E402
from attunet_deploy.demo.phantom3d import make_volume  # noqa: E402
from attunet_deploy.preprocess import normalize, resample_linear, resample_nearest, resampled_shape  # noqa: E402
from attunet_deploy.window import sliding_window  # noqa: E402

NORMALIZE = Normalization("ct_window", level=40.0, width=400.0)
SPACING, ROI, CT, CT_SPACING = (5.0, 6.0, 6.0), (32, 48, 48), (200, 512, 512), (2.5, 0.78125, 0.78125)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "torch_cuda_3d.json"))
    args = ap.parse_args()
    import torch

    from attunet_deploy.checkpoint import load_checkpoint

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    model = load_checkpoint(DEMO3D_WEIGHTS).module.eval()
    dev = torch.device("cuda")
    gpu = model.to(dev)
    cpu_model = load_checkpoint(DEMO3D_WEIGHTS).module.eval()
    rows: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    # parity on 8 phantom windows (model space)
    vols = [normalize(make_volume(900 + i, (32, 64, 64))[0][None, None], NORMALIZE)[0] for i in range(8)]
    x = np.stack(vols)[:, :, :, 8:56, 8:56].copy()
    from attunet_deploy.runtimes.torch_runner import strict_fp32

    with torch.inference_mode():
        ref = cpu_model(torch.from_numpy(x)).numpy()
        tf32 = gpu(torch.from_numpy(x).to(dev)).float().cpu().numpy()  # PyTorch's default: TF32 convolutions
        strict_fp32(torch)  # what the torch runner sets on CUDA
        out32 = gpu(torch.from_numpy(x).to(dev)).float().cpu().numpy()
        with torch.autocast("cuda", dtype=torch.float16):
            out16 = gpu(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

    def dice(a: np.ndarray) -> float:
        p, q = a > 0, ref > 0
        return float(2 * (p & q).sum() / max(1, p.sum() + q.sum()))

    rows["parity"] = {"tf32_default": {"rel_l2": rel(tf32), "dice": dice(tf32)},
                      "fp32": {"rel_l2": rel(out32), "dice": dice(out32)},
                      "fp16_autocast": {"rel_l2": rel(out16), "dice": dice(out16)}}
    print(f"{rows['gpu']}: CUDA with PyTorch's default TF32 rel L2 {rel(tf32):.2e}; "
          f"FP32 rel L2 {rel(out32):.2e} (Dice {dice(out32):.4f}), FP16 rel L2 {rel(out16):.2e} "
          f"(Dice {dice(out16):.4f}) against the CPU", flush=True)

    # one window, CUDA events
    w = torch.from_numpy(x[:1]).to(dev)
    for half in (False, True):
        times = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
            for i in range(60):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                gpu(w)
                b.record()
                torch.cuda.synchronize()
                if i >= 10:
                    times.append(a.elapsed_time(b))
        rows[f"window_ms_{'fp16' if half else 'fp32'}"] = float(np.median(times))
        print(f"window 1x1x{'x'.join(map(str, ROI))} {'FP16' if half else 'FP32'}: p50 {np.median(times):.3f} ms",
              flush=True)

    # a whole CT volume through the numpy sliding window, CUDA predictor
    hu, _ = make_volume(2026, CT)
    for half in (False, True):
        def predict(batch: np.ndarray, half: bool = half) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                return gpu(torch.from_numpy(batch).to(dev)).float().cpu().numpy()

        parts: dict[str, list[float]] = {"total": [], "window": []}
        for rnd in range(4):
            t0 = time.perf_counter()
            v = normalize(hu[None, None], NORMALIZE)
            v = resample_linear(v, resampled_shape(CT, CT_SPACING, SPACING))
            t1 = time.perf_counter()
            logits = sliding_window(predict, v, SlidingWindow(ROI, overlap=0.5, mode="gaussian", batch=4))
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            mask = resample_nearest((logits[0, 0] > 0).astype(np.uint8), CT)
            t3 = time.perf_counter()
            if rnd:
                parts["total"].append(t3 - t0)
                parts["window"].append(t2 - t1)
        key = "fp16" if half else "fp32"
        rows[f"volume_{key}"] = {"total_s": float(np.median(parts["total"])),
                                 "sliding_window_s": float(np.median(parts["window"])),
                                 "model_space": list(v.shape), "mask_voxels": int(mask.sum())}
        print(f"volume {'x'.join(map(str, CT))} {key}: {rows[f'volume_{key}']['total_s']:.2f} s end to end, sliding "
              f"window {rows[f'volume_{key}']['sliding_window_s']:.3f} s", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
