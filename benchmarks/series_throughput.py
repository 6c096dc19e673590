"""Slices per second on a CT series, file in to mask out, against OpenVINO's own upper figure.

    python benchmarks/series_throughput.py [--slices 100] [--size 512] [--rounds 7] [--out benchmarks/results]

A 100-slice 512x512 CT series (DICOM files, the demo phantoms) goes through ``attdeploy predict
--backend ov --precision int8 --no-overlay`` (in-process, wall time from the first file read to the
last mask written). The peer's figure is ``benchmark_app -hint throughput`` at 1x1x512x512 on the
peer's model: NNCF's default INT8 of the same FP32 graph from the same calibration inputs
(``nncf_peer.nncf_default``), raw inference throughput, no I/O at all. Also timed: the same slices
through ``Runner.infer_many`` (inference alone, OpenVINO throughput streams), through ``Runner.infer``
one by one (the latency path), and ``benchmark_app`` on the bundle's own INT8 IR. Each round runs
every path once, in turn. Writes series_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attunet_deploy import load_runner  # noqa: E402
from attunet_deploy.bundle import OV_INT8_XML, Bundle  # noqa: E402
from attunet_deploy.console import Reporter, RichReporter  # noqa: E402
from attunet_deploy.environment import machine_info, module_version  # noqa: E402


def benchmark_app_fps(xml: Path, shape: str, seconds: int) -> float:
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    out = subprocess.run([exe, "-m", str(xml), "-d", "CPU", "-hint", "throughput", "-shape", shape, "-t",
                          str(seconds)], capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
    m = re.search(r"Throughput:\s*([0-9.]+)\s*FPS", out)
    if m is None:
        raise SystemExit("benchmark_app printed no throughput:\n" + out[-2000:])
    return float(m.group(1))


def peer_ir(bundle: Bundle, xml: Path, reporter: Reporter) -> Path:
    """The peer's model saved as IR for benchmark_app: NNCF's default INT8 of the bundle's FP32 graph
    from the calibration inputs quantize used (nncf_peer.py's recipe)."""
    import openvino as ov
    from nncf_peer import nncf_default

    from attunet_deploy.steps.quantize import calibration_inputs

    inputs = calibration_inputs(bundle, None, 64).inputs
    with reporter.step(f"The peer: NNCF default INT8 from the same {len(inputs)} calibration inputs"):
        ov.save_model(nncf_default(bundle.onnx_path("fp32"), inputs), str(xml), compress_to_fp16=False)
    return xml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5, help="benchmark_app's run time per measurement.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--demo-bundle", type=Path, default=ROOT / "benchmarks" / "results" / "demo_bundle")
    args = parser.parse_args()
    from run_benchmarks import demo_bundle

    from attunet_deploy.apps.predict import predict_files
    from attunet_deploy.demo import make_phantoms
    from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
    from attunet_deploy.io.images import read_file

    reporter = RichReporter()
    bundle: Bundle = demo_bundle(args.demo_bundle, reporter)
    if not bundle.has(OV_INT8_XML):
        raise SystemExit(f"{bundle.root} has no {OV_INT8_XML}: quantize with OpenVINO and NNCF installed")
    shape = f"[1,1,{args.size},{args.size}]"
    records: dict[str, list[float]] = {"predict": [], "infer_many": [], "infer_one_by_one": [], "benchmark_app": [],
                                       "benchmark_app_ours": []}
    with tempfile.TemporaryDirectory(prefix="attdeploy-series-") as tmp:
        peer_xml = peer_ir(bundle, Path(tmp) / "peer.xml", reporter)
        series = Path(tmp) / "series"
        hu, _ = make_phantoms(args.slices, seed=11, size=(args.size, args.size))
        write_ct_series(series, volume=hu[:, 0], geometry=SeriesGeometry(spacing=2.5, pixel_spacing=0.7))
        files = sorted(series.iterdir())
        with load_runner(bundle, backend="ov", precision="int8") as runner:
            xs = [runner.preprocess(read_file(f, 1)[0].pixels) for f in files]
            for _ in range(2):
                list(runner.infer_many(xs[:4]))
                runner.infer(xs[0])
            for r in range(args.rounds):
                # predict and the peer's benchmark_app run back to back in every round: on a shared machine
                # the load drifts within a minute, and a round's pair sees the same load.
                with reporter.step(f"round {r + 1}/{args.rounds}: predict, benchmark_app, infer_many, infer"):
                    out = Path(tmp) / f"out{r}"
                    t0 = time.perf_counter()
                    predict_files(bundle, [str(series)], out, backend="ov", precision="int8", overlay=False,
                                  reporter=Reporter())
                    records["predict"].append(args.slices / (time.perf_counter() - t0))
                    records["benchmark_app"].append(benchmark_app_fps(peer_xml, shape, args.seconds))
                    t0 = time.perf_counter()
                    for _ in runner.infer_many(xs):
                        pass
                    records["infer_many"].append(args.slices / (time.perf_counter() - t0))
                    records["benchmark_app_ours"].append(benchmark_app_fps(bundle.path(OV_INT8_XML), shape,
                                                                           args.seconds))
                    t0 = time.perf_counter()
                    for x in xs:
                        runner.infer(x)
                    records["infer_one_by_one"].append(args.slices / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in records.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, records["benchmark_app"])) for k, v in records.items()}
    mach = machine_info()
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": mach, "openvino": module_version("openvino"),
            "slices": args.slices, "size": args.size, "rounds": args.rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "slices_per_s": records, "median": med, "median_round_ratio": paired}
    (args.out / "series_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Series throughput, {args.slices} slices of {args.size}x{args.size} ({meta['date']})", "",
             f"Machine: {mach['cpu_model']}, {mach['cores']} cores, ISA {' '.join(mach['isa']) or '-'}; "
             f"OpenVINO {meta['openvino']}; the demo model; medians of {args.rounds} interleaved rounds. The peer "
             "is NNCF's default INT8 of the same FP32 graph.", "",
             "| path | slices/s | vs benchmark_app (medians) | vs benchmark_app (median of the rounds' ratios) |",
             "|---|---|---|---|"]
    names = {"predict": "`attdeploy predict` (DICOM files in, masks out)", "infer_many": "Runner.infer_many (no I/O)",
             "infer_one_by_one": "Runner.infer one by one (no I/O)",
             "benchmark_app": "benchmark_app -hint throughput, the peer's NNCF default INT8 (no I/O)",
             "benchmark_app_ours": "benchmark_app -hint throughput, the bundle's INT8 IR (no I/O)"}
    for k, v in med.items():
        lines.append(f"| {names[k]} | {v:.2f} | {v / med['benchmark_app']:.2f}x | {paired[k]:.2f}x |")
    (args.out / "series_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
