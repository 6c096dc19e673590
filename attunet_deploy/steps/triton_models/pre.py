"""Triton python model ``attunet_pre``: normalise raw images and pad H/W up to the model's divisor.

Inputs: ``raw`` float32 [N, C, H, W]. Outputs: ``image`` float32 [N, C, H', W'] (H', W' multiples
of the divisor; bottom/right reflection padding, edge for 1-pixel axes) and ``size`` int32 [N, 2]
(the original H, W, for ``attunet_post`` to crop back). Mirrors attunet_deploy.preprocess.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


def normalize(x, spec):
    kind = spec.get("kind", "none")
    if kind == "ct_window":
        lo = spec["level"] - spec["width"] / 2.0
        return np.clip((x - lo) / spec["width"], 0.0, 1.0).astype(np.float32)
    if kind == "mean_std":
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)
    if kind == "scale":
        return (x / np.float32(spec["divisor"])).astype(np.float32)
    if kind == "minmax":
        lo = x.min(axis=(2, 3), keepdims=True)
        hi = x.max(axis=(2, 3), keepdims=True)
        return ((x - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)
    return x.astype(np.float32)


def pad(x, divisor):
    h, w = x.shape[-2:]
    ph, pw = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    if (ph, pw) == (h, w):
        return x
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.ascontiguousarray(np.pad(x, [(0, 0), (0, 0), (0, ph - h), (0, pw - w)], mode=mode))


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.spec = json.loads(params["preprocessing"]["string_value"]).get("normalize", {"kind": "none"})
        self.divisor = int(params["divisor"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "raw").as_numpy().astype(np.float32)
            if not np.isfinite(raw).all():
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("raw contains NaN/Inf values")))
                continue
            n, _, h, w = raw.shape
            image = pad(normalize(raw, self.spec), self.divisor)
            size = np.tile(np.array([[h, w]], dtype=np.int32), (n, 1))
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("image", image), pb_utils.Tensor("size", size)]))
        return responses
