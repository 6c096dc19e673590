"""``serve-dicom --http-port``: ``/healthz`` and Prometheus ``/metrics`` for a site's monitoring."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class NodeMetrics:
    """The node's counters; a no-op recorder where prometheus_client is not installed."""

    def __init__(self, out: Path, outbox: Path) -> None:
        self.out, self.outbox = out, outbox
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            self.registry = None
            return
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("attdeploy_instances_received", "CT instances stored (Success)", registry=r)
        self.refused = Counter("attdeploy_instances_refused", "C-STORE requests refused, by status code",
                               ["status"], registry=r)
        self.ignored = Counter("attdeploy_instances_ignored", "Instances answered Success and not kept (not CT "
                               "Image Storage: a whole-study push), by SOP class", ["sop_class"], registry=r)
        self.segmented = Counter("attdeploy_series_segmented", "Series segmented into results", registry=r)
        self.series_refused = Counter("attdeploy_series_refused", "Series the acceptance gate refused, by rule",
                                      ["rule"], registry=r)
        self.qa = Counter("attdeploy_series_qa", "Segmented series by QA flag (ok, review)", ["status"], registry=r)
        self.failed = Counter("attdeploy_series_failed", "Series moved to failed/", registry=r)
        self.left_out = Counter("attdeploy_instances_left_out", "Stored instances left out of a series' SEG",
                                registry=r)
        self.segs_written = Counter("attdeploy_segs_written", "DICOM SEGs written", registry=r)
        self.segs_forwarded = Counter("attdeploy_segs_forwarded", "SEGs accepted by the --forward peer", registry=r)
        self.inference = Histogram("attdeploy_inference_seconds", "Inference time per series", registry=r,
                                   buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        Gauge("attdeploy_segs_queued", "SEGs waiting in outbox/ to be forwarded", registry=r).set_function(
            lambda: sum(1 for _ in self.outbox.glob("*.dcm")))
        Gauge("attdeploy_free_disk_bytes", "Free disk space under --out", registry=r).set_function(
            lambda: shutil.disk_usage(self.out).free)

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if self.registry is None:
            return
        metric = getattr(self, name)
        (metric.labels(**labels) if labels else metric).inc(amount)

    def observe_inference(self, seconds: float) -> None:
        if self.registry is not None:
            self.inference.observe(seconds)

    def text(self) -> bytes:
        if self.registry is None:
            return b"# prometheus_client is not installed: pip install 'attunet-deploy[dicom]'\n"
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def start_http(bind: str, port: int, metrics: NodeMetrics, healthy: Callable[[], tuple[bool, str]]
               ) -> ThreadingHTTPServer:
    """Serve /healthz (200 or 503 with the reason) and /metrics on (bind, port) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # an idle client cannot hold a thread for longer

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, why = healthy()
                body, code, ctype = (why + "\n").encode(), 200 if ok else 503, "text/plain; charset=utf-8"
            elif path == "/metrics":
                body, code, ctype = metrics.text(), 200, "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, code, ctype = b"not found: /healthz or /metrics\n", 404, "text/plain; charset=utf-8"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # the node's own log is the record; scrapes every few seconds would drown it

    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    server.timeout = 5
    threading.Thread(target=server.serve_forever, name="attdeploy-http", daemon=True).start()
    return server
