"""Runner ``triton``: a model served by Triton Inference Server, judged and timed like any backend.

``verify --backend triton`` checks the *served* model against the golden set; ``bench --backend
triton --concurrency N`` measures served latency and throughput. Options: ``triton_url``
(``http://host:8000``, ``grpc://host:8001``, or ``host:port`` = HTTP; default
``$ATTDEPLOY_TRITON_URL``), ``triton_model`` (default ``attunet_<precision>``) and
``triton_timeout`` (seconds one request may take, default 8; connecting and the health checks
get at most 5), so a server that accepts and never answers costs seconds, not minutes.

A server that is down, a model that is not there, or a request the served model refuses is a
one-line error (exit 2) naming the URL and the model, never an "unavailable" row: asking for
Triton means asking about that server.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from attunet_deploy.bundle import Bundle
from attunet_deploy.environment import has_module
from attunet_deploy.errors import InputError
from attunet_deploy.runtimes.base import Runner
from attunet_deploy.runtimes.registry import register

ENV_URL = "ATTDEPLOY_TRITON_URL"
DEFAULT_TIMEOUT_S = 8.0
CONNECT_TIMEOUT_S = 5.0


def parse_url(url: str) -> tuple[str, str]:
    """('http' | 'grpc', 'host:port'); InputError for anything the clients could choke on."""
    from urllib.parse import urlsplit

    text = url.strip()
    scheme = "http"
    for s in ("http", "grpc"):
        if text.startswith(f"{s}://"):
            scheme, text = s, text[len(s) + 3:].rstrip("/")
            break
    else:
        if "://" in text:
            raise InputError(f"--triton-url {url!r}: use http://HOST:PORT or grpc://HOST:PORT")
    usage = f"--triton-url {url!r}: use HOST:PORT with a port in 1..65535, e.g. localhost:8000 or [::1]:8000"
    if not text or "/" in text or "@" in text or any(c.isspace() for c in text):
        raise InputError(usage)
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise InputError(usage) from None
    if not parts.hostname or port is None or not 0 < port < 65536:
        raise InputError(usage)
    return scheme, text


def check_timeout(value: object) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"--triton-timeout {value!r}: a number of seconds") from None
    if not (0 < t <= 3600):
        raise InputError(f"--triton-timeout {value!r}: must be in (0, 3600] seconds")
    return t


@register
class TritonRunner(Runner):
    backend = "triton"

    @classmethod
    def availability(cls, bundle: Bundle, precision: str) -> str | None:
        if not has_module("tritonclient"):
            return "tritonclient is not installed (pip install 'attunet-deploy[triton]')"
        return None

    def _url(self) -> str:
        url = self.options.get("triton_url") or os.environ.get(ENV_URL)
        if not url:
            raise InputError(f"--backend triton needs --triton-url HOST:PORT (or ${ENV_URL})")
        return str(url)

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self._scheme == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc
            if self._scheme == "grpc":
                client = tc.InferenceServerClient(self._address, verbose=False)
            else:  # geventhttpclient's timeouts are per client: connect, then every read
                client = tc.InferenceServerClient(self._address, verbose=False, connection_timeout=self._connect,
                                                  network_timeout=self._timeout)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _call(self, fn: Any, *args: Any, timeout: float, **kw: Any) -> Any:
        """A client call bounded by ``timeout`` (gRPC per call; HTTP through the client's own)."""
        if self._scheme == "grpc":
            kw["client_timeout"] = timeout
        return fn(*args, **kw)

    def _activate(self) -> None:
        self._scheme, self._address = parse_url(self._url())
        self._timeout = check_timeout(self.options.get("triton_timeout", DEFAULT_TIMEOUT_S))
        self._connect = min(CONNECT_TIMEOUT_S, self._timeout)
        self._model = str(self.options.get("triton_model") or f"attunet_{self.precision}")
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        where = f"{self._scheme}://{self._address}"
        # The health checks run on a client of their own with the short connect bound: a server that
        # accepts and never answers is reported within seconds.
        probe = self._probe_client()
        try:
            try:
                live = self._call(probe.is_server_live, timeout=self._connect)
            except Exception as exc:
                raise InputError(f"Triton server at {where} is not reachable or did not answer within "
                                 f"{self._connect:g} s ({_first(exc)}): start it or fix --triton-url") from None
            if not live:
                raise InputError(f"Triton server at {where} is not live")
            try:
                ready = self._call(probe.is_model_ready, self._model, timeout=self._connect)
            except Exception:
                ready = False
            if not ready:
                raise InputError(f"model {self._model!r} is not ready on the Triton server at {where}: check "
                                 "--triton-model (served models: attunet_<precision>, attunet_cpu, ...)")
            try:
                config = self._call(probe.get_model_config, self._model, timeout=self._connect)
            except Exception as exc:
                raise InputError(f"Triton server at {where} did not send the configuration of {self._model!r} "
                                 f"({_first(exc)})") from None
        finally:
            _close(probe)
        config = config.get("config", config) if isinstance(config, dict) else config.config
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        self._max_batch = int(get("max_batch_size", 0) or 0)
        self._where = where

    def _probe_client(self) -> Any:
        if self._scheme == "grpc":
            import tritonclient.grpc as tc

            return tc.InferenceServerClient(self._address, verbose=False)
        import tritonclient.http as tc

        return tc.InferenceServerClient(self._address, verbose=False, connection_timeout=self._connect,
                                        network_timeout=self._connect)

    def _deactivate(self) -> None:
        # An unclosed HTTP client keeps the server's shutdown waiting (about 30 s).
        for client in getattr(self, "_clients", []):
            try:
                client.close()
            except Exception:
                pass
        self._clients = []
        self._local = threading.local()

    @property
    def device(self) -> str:
        return f"triton {getattr(self, '_where', '?')} ({getattr(self, '_model', '?')})"

    def _infer_padded(self, x: np.ndarray) -> np.ndarray:
        step = self._max_batch if self._max_batch > 0 else x.shape[0]
        return np.concatenate([self._request(x[s:s + step]) for s in range(0, x.shape[0], step)])

    def _request(self, x: np.ndarray) -> np.ndarray:
        if self._scheme == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        inp = tc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        try:
            result = self._call(self._client().infer, self._model, [inp],
                                outputs=[tc.InferRequestedOutput("logits")], timeout=self._timeout)
        except Exception as exc:
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            if _is_timeout(exc):
                raise InputError(f"Triton model {self._model!r} at {self._where} did not answer a "
                                 f"{'x'.join(map(str, x.shape))} request within {self._timeout:g} s: raise "
                                 "--triton-timeout for large requests, or check the server") from None
            raise InputError(f"Triton model {self._model!r} at {self._where} refused a {'x'.join(map(str, x.shape))} "
                             f"request: {text}") from None
        return np.array(result.as_numpy("logits"), dtype=np.float32, copy=True)

    def bench_extras(self) -> dict[str, object]:
        return {"triton_model": getattr(self, "_model", None), "triton_url": getattr(self, "_where", None)}


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:120] if text else type(exc).__name__)


def _is_timeout(exc: BaseException) -> bool:
    import socket

    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (TimeoutError, socket.timeout)) or "timeout" in text or "timed out" in text \
        or "deadline" in text


def _close(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass
