"""The DICOM node's cost over bare inference: push a synthetic CT series, time series -> SEG.

Starts `attdeploy serve-dicom` on 127.0.0.1 (a separate process), sends a 100-slice 512x512
series with pynetdicom's own storescu, and reads the node's JSON log. Then times bare
``runner.segment`` on the same HU slices in the same batches (8) in this process.

    python benchmarks/dicom_node.py [-b BUNDLE] [--slices 100] [--size 512] [--quiet 2] [--json PATH]
    python benchmarks/dicom_node.py --demo 3d     # the 3D demo: a 200-slice 512x512 series as one volume

With ``--demo 3d`` the series is one phantom volume at 2.5 x 0.78 x 0.78 mm, bare is
``runner.segment_volume(hu, spacing)`` on the same volume, and the node cannot segment ahead (a 3D
model's windows span many slices): its time after the last instance (decode, segment, SEG) is what
is compared with bare; the transfer is reported beside it.

Reported: transfer time (first C-STORE to storescu's exit), quiet wait, the node's time for the
series = first C-STORE to SEG on disk minus the quiet wait (receive + write + decode + segment +
build and write the SEG; the node segments slices while the series is still arriving), bare
segment time, the node's overhead = node time / bare - 1 (target < 15 %), slices/s, and
series-to-SEG latency (last instance acknowledged to SEG on disk, which includes the quiet wait),
and the node's resident memory (psutil): when its worker is ready, after each series, and the peak
(sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DCMTK_STORESCU = "/usr/bin/storescu"  # by absolute path: pynetdicom's own app shadows it inside a venv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-b", "--bundle", default=None, help="bundle (default: export + quantize the demo model)")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--quiet", type=float, default=2.0, help="node --quiet-seconds")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--precision", default="fp32", help="e.g. int8 with --backend ov (the bundle must have it)")
    ap.add_argument("--client", choices=["dcmtk", "pynetdicom"], default="dcmtk" if Path(DCMTK_STORESCU).exists()
                    else "pynetdicom", help="the sending side: DCMTK's storescu (C, as a scanner sends) or "
                    "pynetdicom's (Python: its CPU use on this machine's cores is counted against the node)")
    ap.add_argument("--repeat", type=int, default=3, help="series pushed (medians are reported)")
    ap.add_argument("--json", default=None, help="default: results/dicom_node.json (3D: dicom_node_3d.json)")
    ap.add_argument("--demo", choices=["2d", "3d"], default="2d", help="demo model when no -b is given")
    args = ap.parse_args()
    volume = args.demo == "3d"
    if volume and args.slices == 100:
        args.slices = 200
    args.json = args.json or str(HERE / "results" / ("dicom_node_3d.json" if volume else "dicom_node.json"))

    from attunet_deploy import load_runner
    from attunet_deploy.apps.dicom.series import segment_slices
    from attunet_deploy.demo.ctseries import SeriesGeometry, write_ct_series
    from attunet_deploy.environment import machine_info

    work = Path(tempfile.mkdtemp(prefix="attdeploy-dicom-bench-"))
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    if not args.bundle:
        from attunet_deploy.demo import DEMO3D_WEIGHTS

        demo = [str(DEMO3D_WEIGHTS)] if volume else []
        subprocess.run([sys.executable, "-m", "attunet_deploy.cli", "export", *demo, "-o", str(bundle)], check=True,
                       capture_output=True)
    print(f"writing {args.repeat} CT series of {args.slices} slices, {args.size}x{args.size} ...", flush=True)
    spacing = (2.5, 400.0 / args.size, 400.0 / args.size)  # a 40 cm field of view
    if volume:
        from attunet_deploy.demo.phantom3d import make_volume

        geometry = SeriesGeometry(spacing=spacing[0], pixel_spacing=spacing[1])
        shape = (args.slices, args.size, args.size)
        series = [write_ct_series(work / f"series{k}", volume=make_volume(7 + k, shape)[0], geometry=geometry)
                  for k in range(args.repeat)]
    else:
        series = [write_ct_series(work / f"series{k}", args.slices, (args.size, args.size), seed=7 + k)
                  for k in range(args.repeat)]

    def bare(runner: object, hu: np.ndarray) -> None:
        if volume:
            runner.segment_volume(hu, spacing=spacing)  # type: ignore[attr-defined]
        else:
            segment_slices(runner, hu)  # type: ignore[arg-type]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = work / "out"
    log = work / "node.log"
    runs = []
    with open(log, "w") as fh:
        node = subprocess.Popen([sys.executable, "-m", "attunet_deploy.cli", "serve-dicom", "-b", str(bundle),
                                 "--out", str(out), "--port", str(port), "--bind", "127.0.0.1", "--quiet-seconds",
                                 str(args.quiet), "--backend", args.backend, "--precision", args.precision,
                                 "--log-json"], stdout=fh,
                                stderr=subprocess.STDOUT)
    import threading

    import psutil

    rss = {"peak": 0}
    sampling = threading.Event()

    def sample() -> None:
        proc = psutil.Process(node.pid)
        while not sampling.wait(0.1):
            try:
                rss["peak"] = max(rss["peak"], proc.memory_info().rss)
            except psutil.Error:
                return
    try:
        while "ready" not in log.read_text():
            if node.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.1)
        time.sleep(1.0)
        rss["ready"] = psutil.Process(node.pid).memory_info().rss
        threading.Thread(target=sample, daemon=True).start()
        with load_runner(bundle, backend=args.backend, precision=args.precision) as runner:
            bare(runner, np.stack([s.hu for s in series[0][:8 if not volume else None]]))  # warm-up, as the node did
            for k, slices in enumerate(series):
                # node and bare alternate, so drifting load on a shared machine hits both alike
                t0 = time.time()
                files = sorted(str(f) for f in (work / f"series{k}").iterdir())
                client = [DCMTK_STORESCU, "-aec", "ATTDEPLOY", "127.0.0.1", str(port), *files] \
                    if args.client == "dcmtk" else [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1",
                                                    str(port), str(work / f"series{k}"), "-aec", "ATTDEPLOY", "-r",
                                                    "-cx"]
                subprocess.run(client, check=True, capture_output=True)
                t_sent = time.time()
                while len(list((out / "seg").glob("*.dcm"))) <= k:
                    time.sleep(0.05)
                t_seg = time.time()
                t = time.perf_counter()
                bare(runner, np.stack([s.hu for s in slices]))
                bare_s = time.perf_counter() - t
                runs.append({"transfer_s": t_sent - t0, "series_to_seg_s": t_seg - t_sent,
                             "node_time_s": (t_seg - t0) - args.quiet, "bare_segment_s": bare_s,
                             "node_rss_after_mb": psutil.Process(node.pid).memory_info().rss / 2**20})
                print(f"  series {k + 1}: node {runs[-1]['node_time_s']:.2f} s, bare {bare_s:.2f} s", flush=True)
    finally:
        sampling.set()
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
    events = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    written = [e for e in events if e["event"] == "written"]
    received = [e for e in events if e["event"] == "received"]
    assert len(received) == args.slices * args.repeat, f"{len(received)} instances received"

    def med(key: str, rows: list[dict]) -> float:
        return float(np.median([r[key] for r in rows]))

    node_time, bare_s = med("node_time_s", runs), med("bare_segment_s", runs)
    result = {
        "slices": args.slices, "size": args.size, "backend": args.backend, "precision": args.precision,
        "client": args.client, "quiet_seconds": args.quiet,
        "repeat": args.repeat, "runs": runs, "transfer_s": med("transfer_s", runs),
        "series_to_seg_s": med("series_to_seg_s", runs), "node_time_s": node_time,
        "after_complete_s": float(np.median([e["seconds"] for e in written])),
        "segmented_ahead": int(np.median([e.get("segmented_ahead", 0) for e in written])),
        "bare_segment_s": bare_s, "overhead": node_time / bare_s - 1.0, "node_slices_per_s": args.slices / node_time,
        "model": "3D demo (oktay3d), whole series as one volume" if volume else "2D demo, slice batches of 2",
        "overhead_after_complete": (float(np.median([e["seconds"] for e in written])) / bare_s - 1.0),
        "bare_slices_per_s": args.slices / bare_s, "machine": machine_info(),
        "node_rss_ready_mb": rss["ready"] / 2**20, "node_rss_after_series_mb": runs[-1]["node_rss_after_mb"],
        "node_rss_peak_mb": rss["peak"] / 2**20,
    }
    processing = result["after_complete_s"]
    rows = [("transfer (storescu, first to last instance)", f"{result['transfer_s']:.2f} s"),
            ("quiet wait (--quiet-seconds)", f"{args.quiet:.2f} s"),
            ("node time: first C-STORE to SEG, minus quiet", f"{node_time:.2f} s"),
            ("  after completion: order, rest, SEG", f"{processing:.2f} s"),
            ("  slices segmented while arriving", f"{result['segmented_ahead']} / {args.slices}"),
            ("bare segment_volume of the volume" if volume else "bare runner.segment, same slices and batches",
             f"{bare_s:.2f} s"),
            ("node overhead over bare", f"{100 * result['overhead']:+.1f} %"),
            ("node after completion over bare", f"{100 * result['overhead_after_complete']:+.1f} %"),
            ("node slices/s", f"{result['node_slices_per_s']:.1f}"),
            ("bare slices/s", f"{result['bare_slices_per_s']:.1f}"),
            ("series-to-SEG (last ack to SEG on disk)", f"{result['series_to_seg_s']:.2f} s"),
            ("node RSS when ready", f"{result['node_rss_ready_mb']:.0f} MB"),
            ("node RSS after the last series", f"{result['node_rss_after_series_mb']:.0f} MB"),
            ("node RSS peak", f"{result['node_rss_peak_mb']:.0f} MB")]
    m = result["machine"]
    print(f"\nDICOM node, {args.slices} x {args.size}x{args.size} CT, {args.backend}/{args.precision}, sent by "
          f"{args.client}'s storescu, medians of {args.repeat}; "
          f"{m['cpu_model']}, "
          f"{m['cores']} cores, {' '.join(m['isa'])}")
    for k, v in rows:
        print(f"  {k:<48} {v:>10}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
