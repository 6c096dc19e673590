"""Triton python model ``attunet_volume`` (BLS): a whole raw volume in, its uint8 mask out.

Inputs: ``volume`` float32 [D, H, W] (or [C, D, H, W]) in raw units (HU for CT), optional ``spacing``
float32 [3] (z, y, x mm; zeros or absent: the volume is taken at the model's spacing). Output:
``mask`` uint8 [D, H, W]. The steps are ``Segmenter.segment_volume``, the same code as the in-process
``Runner.segment_volume`` (the package's numpy modules are shipped beside this file): normalise,
resample to the bundle's spacing, sliding window (each batch of windows, padded to the divisors, sent
to the inference model named in the config, ``attunet_cpu``, ``attunet_<precision>`` or
``attunet_trt_<precision>``, by a BLS request), threshold/argmax, resample the mask back.
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
        from attunet_deploy.bundle.spec import ModelSpec
        from attunet_deploy.errors import InputError
        from attunet_deploy.segmenter import Segmenter

        params = json.loads(args["model_config"]).get("parameters", {})
        self.segmenter = Segmenter(ModelSpec.from_dict(json.loads(params["spec"]["string_value"])))
        self.infer_model = params["inference_model"]["string_value"]
        self.input_error = InputError

    def _predict(self, padded):
        """One BLS request: a padded batch of windows -> its logits."""
        request = pb_utils.InferenceRequest(model_name=self.infer_model, requested_output_names=["logits"],
                                            inputs=[pb_utils.Tensor("image", padded)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.infer_model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

    def _spacing(self, request):
        sp = pb_utils.get_input_tensor_by_name(request, "spacing")
        if sp is None:
            return None
        values = [float(v) for v in sp.as_numpy().reshape(-1)]
        if len(values) != 3 or not all(np.isfinite(values)) or any(v < 0 for v in values):
            raise self.input_error(f"spacing {values}: three non-negative numbers (z, y, x) in mm")
        return tuple(values) if all(v > 0 for v in values) else None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy()
                mask = self.segmenter.segment_volume(self._predict, volume, self._spacing(request),
                                                     who=self.infer_model)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("mask", mask)]))
            except Exception as exc:  # one bad request is that request's error, never the model's death
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500])))
        return responses
