"""Stand-ins for TensorRT and CUDA that imitate their documented behaviour (Polygraphy 0.49's TrtRunner,
TensorRT's inspector JSON, cudart): tests of our logic only, never evidence that TensorRT works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def inspector_json(kinds: list[str]) -> dict[str, Any]:
    """TensorRT 10 layout: one combined "Format/Datatype" string per tensor; conv inputs = outputs."""
    return {"Layers": [{"Name": f"l{i}", "LayerType": "CaskConvolution",
                        "Inputs": [{"Name": "x", "Format/Datatype": k}],
                        "Outputs": [{"Name": "t", "Format/Datatype": k}]} for i, k in enumerate(kinds)]
            + [{"Name": "r", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Float"}],
                "Outputs": [{"Format/Datatype": "Int8"}]}]}


def layer(kind: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Name": kind, "LayerType": kind, "Inputs": inputs, "Outputs": outputs}


class ReusingRunner:
    """Polygraphy-style infer(): outputs are views of one host buffer reused (and resized)
    by the next call, as TrtRunner._get_array_on_cpu does."""

    def __init__(self, out_channels: int = 2) -> None:
        self.buffer = np.empty(0, np.uint8)
        self.k = out_channels
        self.batches: list[int] = []

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["image"]
        self.batches.append(x.shape[0])
        y = np.repeat(x.mean(axis=1, keepdims=True), self.k, axis=1).astype(np.float32) * 3.0
        nbytes = y.nbytes
        self.buffer.resize((nbytes,), refcheck=False)
        view = self.buffer[:nbytes].view(np.float32).reshape(y.shape)
        view[...] = y
        return {"logits": view}


class FakeCudart:
    """Records the order of CUDA calls; elapsed time is fixed at 2.5 ms."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.events = 0

    def cudaEventCreate(self) -> tuple[int, str]:
        self.events += 1
        return 0, f"ev{self.events}"

    def cudaEventRecord(self, event: str, stream: int) -> tuple[int]:
        self.log.append(f"record {event} on {stream}")
        return (0,)

    def cudaEventSynchronize(self, event: str) -> tuple[int]:
        self.log.append("sync")
        return (0,)

    def cudaEventElapsedTime(self, a: str, b: str) -> tuple[int, float]:
        return 0, 2.5

    def cudaEventDestroy(self, event: str) -> tuple[int]:
        return (0,)
