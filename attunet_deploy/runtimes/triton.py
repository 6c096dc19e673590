"""Runner ``triton``: a model served by Triton Inference Server, judged and timed like any backend.

``verify --backend triton`` checks the *served* model against the golden set; ``bench --backend
triton --concurrency N`` measures served latency and throughput. Options: ``triton_url``
(``http://host:8000``, ``grpc://host:8001``, or ``host:port`` = HTTP; default
``$ATTDEPLOY_TRITON_URL``) and ``triton_model`` (default ``attunet_<precision>``).

A server that is down, a model that is not there, or a request the served model refuses is a
one-line error (exit 2) naming the URL and the model, never an "unavailable" row: asking for
Triton means asking about that server.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..environment import has_module
from ..errors import InputError
from .base import Runner, register

ENV_URL = "ATTDEPLOY_TRITON_URL"


def parse_url(url: str) -> tuple[str, str]:
    """('http' | 'grpc', 'host:port')."""
    text = url.strip()
    for scheme in ("http", "grpc"):
        if text.startswith(f"{scheme}://"):
            return scheme, text[len(scheme) + 3:].rstrip("/")
    if "://" in text:
        raise InputError(f"--triton-url {url!r}: use http://HOST:PORT or grpc://HOST:PORT")
    if not text or ":" not in text:
        raise InputError(f"--triton-url {url!r}: use HOST:PORT, e.g. localhost:8000")
    return "http", text


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
            client = tc.InferenceServerClient(self._address, verbose=False)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _activate(self) -> None:
        self._scheme, self._address = parse_url(self._url())
        self._model = str(self.options.get("triton_model") or f"attunet_{self.precision}")
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        where = f"{self._scheme}://{self._address}"
        try:
            client = self._client()
            live = client.is_server_live()
        except Exception as exc:
            raise InputError(f"Triton server at {where} is not reachable ({str(exc).splitlines()[0][:120]}): "
                             "start it or fix --triton-url") from None
        if not live:
            raise InputError(f"Triton server at {where} is not live")
        try:
            ready = client.is_model_ready(self._model)
        except Exception:
            ready = False
        if not ready:
            raise InputError(f"model {self._model!r} is not ready on the Triton server at {where}: check "
                             "--triton-model (served models: attunet_<precision>, attunet_cpu, ...)")
        config = client.get_model_config(self._model)
        config = config.get("config", config) if isinstance(config, dict) else config.config
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        self._max_batch = int(get("max_batch_size", 0) or 0)
        self._where = where

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
            result = self._client().infer(self._model, [inp], outputs=[tc.InferRequestedOutput("logits")])
        except Exception as exc:
            raise InputError(f"Triton model {self._model!r} at {self._where} refused a {'x'.join(map(str, x.shape))} "
                             f"request: {' '.join(str(exc).split())[:200]}") from None
        return np.array(result.as_numpy("logits"), dtype=np.float32, copy=True)

    def bench_extras(self) -> dict[str, Any]:
        return {"triton_model": getattr(self, "_model", None), "triton_url": getattr(self, "_where", None)}
