"""Triton python model ``attunet_volume`` (BLS): a whole raw volume in, its uint8 mask out.

Inputs: ``volume`` float32 [D, H, W] (or [C, D, H, W]) in raw units (HU for CT), optional ``spacing``
float32 [3] (z, y, x mm; zeros or absent: the volume is taken at the model's spacing). Output:
``mask`` uint8 [D, H, W]. Steps, the same code as ``Runner.segment_volume`` in-process (the package's
numpy modules are shipped beside this file): normalise, resample to the bundle's spacing, sliding
window (roi, overlap, Gaussian or constant blending, windows per call), each batch of windows sent to
the inference model named in the config (``attunet_cpu``, ``attunet_<precision>`` or
``attunet_trt_<precision>``) by a BLS request, threshold/argmax, resample the mask back.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # The attunet_deploy subset shipped in this version folder (numpy only): imported from there.
        sys.path.insert(0, os.path.join(args["model_repository"], args["model_version"]))
        global InputError, crop, logits_to_masks, normalize, pad_to_divisor, resample_linear, resample_nearest
        global resampled_shape, sliding_window
        from attunet_deploy.errors import InputError
        from attunet_deploy.preprocess import (
            crop,
            logits_to_masks,
            normalize,
            pad_to_divisor,
            resample_linear,
            resample_nearest,
            resampled_shape,
        )
        from attunet_deploy.runtimes.window import sliding_window

        params = json.loads(args["model_config"]).get("parameters", {})
        self.model = json.loads(params["bundle"]["string_value"])
        self.infer_model = params["inference_model"]["string_value"]

    def _predict(self, x):
        padded, size = pad_to_divisor(np.ascontiguousarray(x, dtype=np.float32), self.model["divisors"])
        request = pb_utils.InferenceRequest(model_name=self.infer_model, requested_output_names=["logits"],
                                            inputs=[pb_utils.Tensor("image", padded)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.infer_model}: {response.error().message()}")
        logits = pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()
        return crop(np.asarray(logits, dtype=np.float32), size)

    def segment(self, volume, spacing):
        m = self.model
        channels = int(m["channels"])
        x = volume[None] if volume.ndim == 3 else volume
        if x.ndim != 4 or x.shape[0] != channels or min(x.shape[1:]) < 1:
            raise InputError(f"volume of shape {list(volume.shape)}: expected [D, H, W] or [{channels}, D, H, W]")
        if not np.isfinite(x).all():
            raise InputError("volume contains NaN/Inf values")
        size = x.shape[1:]
        x = normalize(x[None].astype(np.float32), m["preprocessing"])
        target = m.get("spacing")
        if spacing is not None and target is not None:
            x = resample_linear(x, resampled_shape(size, spacing, target))
        w = m["sliding_window"]
        logits = sliding_window(self._predict, x, w["roi"], overlap=float(w.get("overlap", 0.5)),
                                mode=str(w.get("mode", "gaussian")), sigma_scale=float(w.get("sigma_scale", 0.125)),
                                batch=int(w.get("batch", 1)))
        mask = logits_to_masks(logits, m["postprocessing"])[0]
        if mask.shape != size:
            mask = resample_nearest(mask, size)
        return mask.astype(np.uint8)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy().astype(np.float32)
                sp = pb_utils.get_input_tensor_by_name(request, "spacing")
                spacing = None
                if sp is not None:
                    values = [float(v) for v in sp.as_numpy().reshape(-1)]
                    if len(values) != 3 or not all(np.isfinite(values)) or any(v < 0 for v in values):
                        raise InputError(f"spacing {values}: three non-negative numbers (z, y, x) in mm")
                    spacing = tuple(values) if all(v > 0 for v in values) else None
                mask = self.segment(volume, spacing)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("mask", mask)]))
            except Exception as exc:  # one bad request is that request's error, never the model's death
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500])))
        return responses
