"""Run a model repository on the real ``tritonserver`` inside the ``nvidia-pytriton`` wheel.

That binary carries only Triton's python backend and runs on a CPU (glibc >= 2.35), so a
repository written by ``attdeploy triton --kind cpu`` (``attunet_cpu``, ``attunet_pre``,
``attunet_post``, ``attunet_segment``) can be served and checked on a machine without docker.
pytriton pins numpy < 2, so it lives in a venv of its own (default ``.venv-triton``). The server
binds 127.0.0.1 only and is stopped by pid when the context ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from attunet_deploy.errors import BackendUnavailable

CPU_MODELS = ("attunet_cpu", "attunet_pre", "attunet_post", "attunet_segment")


@dataclass
class LocalTriton:
    http: str  # host:port
    grpc: str  # grpc://host:port
    pid: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(venv: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """tritonserver's path with a backend folder made from the wheel, and its environment."""
    python = venv / "bin" / "python"
    if not python.exists():
        raise BackendUnavailable(f"no Triton venv at {venv}: python3 -m venv {venv} && {venv}/bin/pip install "
                                 "nvidia-pytriton onnxruntime")
    probe = ("import json, os, sys, sysconfig, pytriton; print(json.dumps({'pkg': os.path.dirname(pytriton.__file__), "
             "'libdir': sysconfig.get_config_var('LIBDIR'), 'ver': f'{sys.version_info[0]}.{sys.version_info[1]}', "
             "'site': sysconfig.get_paths()['purelib']}))")
    try:
        info = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120,
                                         check=True).stdout)
    except (subprocess.SubprocessError, ValueError) as exc:
        raise BackendUnavailable(f"the venv {venv} has no usable nvidia-pytriton: {exc}") from None
    pkg = Path(info["pkg"]) / "tritonserver"
    stub = pkg / "python_backend_stubs" / info["ver"] / "triton_python_backend_stub"
    if not (pkg / "bin" / "tritonserver").exists() or not stub.exists():
        raise BackendUnavailable(f"nvidia-pytriton in {venv} has no tritonserver or stub for Python {info['ver']}")
    backends = work / "backends"
    shutil.copytree(pkg / "backends" / "python", backends / "python", dirs_exist_ok=True)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")  # the stub must sit beside the backend
    libs = [info["libdir"], str(Path(info["site"]) / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in libs if p),
           "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "PYTHONPATH": info["site"]}
    return [str(pkg / "bin" / "tritonserver"), f"--backend-directory={backends}"], env


@contextmanager
def serve(repo: str | os.PathLike[str], venv: str | os.PathLike[str] = ".venv-triton",
          models: tuple[str, ...] = CPU_MODELS, timeout: float = 120.0) -> Iterator[LocalTriton]:
    """tritonserver on 127.0.0.1 serving ``models`` of ``repo``; stopped when the block ends."""
    with tempfile.TemporaryDirectory(prefix="attdeploy-triton-") as tmp:
        work = Path(tmp)
        cmd, env = server_command(Path(venv).resolve(), work)
        http, grpc, metrics = _free_port(), _free_port(), _free_port()
        cmd += [f"--model-repository={Path(repo).resolve()}", "--model-control-mode=explicit", "--exit-on-error=false",
                "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
        cmd += [f"--load-model={m}" for m in models]
        log = work / "server.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    raise BackendUnavailable(f"tritonserver did not become ready: {log.read_text()[-600:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.3)
            yield LocalTriton(f"127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}", proc.pid, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
