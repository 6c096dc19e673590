"""What this machine can run: library versions, ONNX Runtime providers, CUDA devices, TensorRT.

Every probe is cheap, never raises, and never imports torch unless asked about torch. CUDA is
probed through ``cuda.bindings`` (``cudaGetDeviceCount`` returns an error code instead of
crashing when there is no driver) *before* any TensorRT object is made: without a GPU, a
TensorRT runtime only logs a CUDA failure and the next call on it can crash the process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, TypedDict


class GpuIdentity(TypedDict):
    """A CUDA device as engines are tied to it (and as the manifest records it)."""

    index: int
    name: str
    compute_capability: str
    multiprocessors: int
    memory_mb: int


class MachineInfo(TypedDict):
    """The machine a figure comes from: CPU model, cores, architecture and the ISA flags that matter."""

    cpu_model: str
    cores: int
    arch: str
    isa: list[str]


@dataclass
class Probe:
    """One component: available or not, its version, and why not."""

    name: str
    available: bool
    version: str = ""
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "version": self.version,
                "detail": self.detail, **self.extra}


def module_version(name: str) -> str | None:
    """Installed version of a module without importing heavy packages where metadata suffices."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - py3.8+ always has it
        return None
    dist = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tensorrt": ("tensorrt", "tensorrt-cu12",
            "tensorrt-cu13"), "PIL": ("pillow",), "cuda": ("cuda-python", "cuda-bindings")}.get(name, (name,))
    for d in dist:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    if importlib.util.find_spec(name) is None:
        return None
    mod = importlib.import_module(name)  # e.g. JetPack's tensorrt has no dist metadata
    return str(getattr(mod, "__version__", "unknown"))


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def cuda_devices() -> Probe:
    """Number and names of CUDA devices via cuda-python's runtime bindings (no torch)."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]  # cuda-python < 12.6
        except ImportError:
            return Probe("cuda", False, detail="cuda-python is not installed "
                         "(pip install 'attunet-deploy[tensorrt]')")
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:
        return Probe("cuda", False, detail=f"CUDA runtime unusable: {exc}")
    if int(err) != 0 or count == 0:
        return Probe("cuda", False, detail=f"no CUDA device ({_cuda_error_name(cudart, err)})")
    gpus: list[GpuIdentity] = []
    for i in range(count):
        err, prop = cudart.cudaGetDeviceProperties(i)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            gpus.append(GpuIdentity(index=i, name=name.strip("\x00 "), compute_capability=f"{prop.major}.{prop.minor}",
                                    multiprocessors=int(prop.multiProcessorCount),
                                    memory_mb=int(prop.totalGlobalMem) // (1 << 20)))
    _, drv = cudart.cudaDriverGetVersion()
    _, rt = cudart.cudaRuntimeGetVersion()
    version = f"driver {drv // 1000}.{drv % 1000 // 10}, runtime {rt // 1000}.{rt % 1000 // 10}"
    return Probe("cuda", True, version=version, detail=f"{count} device(s)", extra={"gpus": gpus})


def _cuda_error_name(cudart: Any, err: Any) -> str:
    try:
        return str(cudart.cudaGetErrorName(err)[1].decode())
    except Exception:
        return f"error {int(err)}"


def free_device_memory_mb() -> int | None:
    """Free memory on the current CUDA device, or None when it cannot be read."""
    if not cuda_devices().available:
        return None
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
        err, free, _total = cudart.cudaMemGetInfo()
        return int(free) // (1 << 20) if int(err) == 0 else None
    except Exception:
        return None


def gpu_identity() -> GpuIdentity | None:
    """Name and compute capability of device 0 (what engines are tied to)."""
    probe = cuda_devices()
    gpus: list[GpuIdentity] = probe.extra.get("gpus") or []
    return GpuIdentity(**gpus[0]) if probe.available and gpus else None


@functools.lru_cache(maxsize=1)
def cpu_has_int8_dot() -> bool:
    """True when the CPU has an int8 dot-product instruction (x86 VNNI/AMX, or any Arm64).

    Without it, ONNX Runtime's x86 int8 convolutions use int16 pairwise sums that saturate
    with full-range (8-bit) weights.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


#: x86 ISA flags that decide INT8/BF16/FP16 speed on a CPU (as /proc/cpuinfo names them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
             "amx_bf16")


@functools.lru_cache(maxsize=1)
def machine_info() -> MachineInfo:
    """CPU model, core count and the ISA flags that matter, recorded with every benchmark:
    figures from two machines are never comparable, and this says which machine it was."""
    import os

    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    if platform.machine().lower() in ("aarch64", "arm64"):
        isa += [f for f in ("asimddp", "i8mm", "bf16", "sve") if f in flags]
    return MachineInfo(cpu_model=model, cores=os.cpu_count() or 1, arch=platform.machine(), isa=isa)


def tensorrt_probe() -> Probe:
    version = module_version("tensorrt") if has_module("tensorrt") else None
    if version is None:
        return Probe("tensorrt", False, detail="TensorRT python bindings not installed (pip install "
                     "'attunet-deploy[tensorrt]' on x86; JetPack's python3-libnvinfer on Jetson)")
    cuda = cuda_devices()
    if not cuda.available:
        return Probe("tensorrt", False, version=version, detail=f"TensorRT {version} installed, but {cuda.detail}")
    return Probe("tensorrt", True, version=version, detail="ready")


def tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def onnxruntime_distributions() -> list[str]:
    """Installed ONNX Runtime distributions; they all provide the one ``onnxruntime`` module."""
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    return sorted(n for n in names if n == "onnxruntime" or n.startswith("onnxruntime-"))


ORT_CLASH_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
                 "(the two packages overwrite one module)")


def onnxruntime_probe() -> Probe:
    if not has_module("onnxruntime"):
        return Probe("onnxruntime", False, detail="not installed (pip install onnxruntime)")
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    dists = [d for d in onnxruntime_distributions() if d in ("onnxruntime", "onnxruntime-gpu")]
    if len(dists) > 1:
        return Probe("onnxruntime", False, version=ort.__version__,
                     detail=f"both {' and '.join(dists)} are installed: {ORT_CLASH_FIX}",
                     extra={"providers": providers, "device": ort.get_device()})
    return Probe("onnxruntime", True, version=ort.__version__, detail=", ".join(providers),
                 extra={"providers": providers, "device": ort.get_device()})


def torch_probe() -> Probe:
    if not has_module("torch"):
        return Probe("torch", False, detail="not installed: the torch reference runner and export need "
                     "pip install 'attunet-deploy[torch]'")
    import torch

    cuda = bool(torch.cuda.is_available())
    return Probe("torch", True, version=torch.__version__,
                 detail="CUDA available" if cuda else "CPU only", extra={"cuda": cuda})


def versions(include_torch: bool = False) -> dict[str, str]:
    """Versions recorded with every artifact and benchmark (torch only when it is loaded)."""
    from attunet_deploy.version import __version__

    out = {"attunet_deploy": __version__, "python": platform.python_version()}
    for name in ("numpy", "onnx", "onnxruntime", "tensorrt"):
        v = module_version(name) if has_module(name) else None
        if v:
            out[name] = v
    if include_torch or "torch" in sys.modules:
        v = module_version("torch") if has_module("torch") else None
        if v:
            out["torch"] = v
    return out


def nvidia_smi_gpus() -> Probe:
    """GPUs as the NVIDIA driver lists them (works without cuda-python or torch)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return Probe("gpu", False, detail="no NVIDIA driver found (nvidia-smi missing)")
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe("gpu", False, detail=f"nvidia-smi failed: {exc}")
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines:
        return Probe("gpu", False, detail=(out.stderr or out.stdout).strip()[:200] or "no GPU listed")
    driver = lines[0].split(",")[-1].strip()
    return Probe("gpu", True, version=f"driver {driver}",
                 detail="; ".join(", ".join(p.strip() for p in ln.split(",")[:3]) for ln in lines))


def doctor_report() -> list[Probe]:
    """Everything ``attdeploy doctor`` prints, in order."""
    probes = [Probe("python", True, platform.python_version(), f"{platform.system()} {platform.machine()}")]
    for name in ("numpy", "onnx"):
        v = module_version(name) if has_module(name) else None
        probes.append(Probe(name, v is not None, v or "", "" if v else f"not installed (pip install {name})"))
    probes.append(torch_probe())
    probes.append(onnxruntime_probe())
    probes.append(tensorrt_probe())
    probes.append(cuda_devices())
    probes.append(nvidia_smi_gpus())
    m = machine_info()
    probes.append(Probe("cpu", True, m["arch"], f"{m['cpu_model']}, {m['cores']} cores, ISA "
                        f"{' '.join(m['isa']) or '-'}; INT8 dot product: {'yes' if cpu_has_int8_dot() else 'no'}",
                        extra={"machine": m}))
    for name, extra, purpose in (("openvino", "openvino", "OpenVINO backend 'ov'"),
                                 ("pynetdicom", "dicom", "serve-dicom"), ("highdicom", "dicom", "DICOM SEG output"),
                                 ("tritonclient", "triton", "'attdeploy triton' and the 'triton' backend")):
        v = module_version(name) if has_module(name) else None
        probes.append(Probe(name, v is not None, v or "",
                            purpose if v else f"not installed: pip install 'attunet-deploy[{extra}]' for {purpose}"))
    return probes
