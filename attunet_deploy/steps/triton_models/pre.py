"""Triton python model ``attunet_pre``: normalise raw images and pad H/W up to the model's divisor.

Inputs: ``raw`` float32 [N, C, H, W]. Outputs: ``image`` float32 [N, C, H', W'] (H', W' multiples
of the divisor) and ``size`` int32 [N, 2] (the original H, W, for ``attunet_post`` to crop back).
The work is the package's own Segmenter (shipped beside this file), so the served steps are the
in-process ones.
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
        from attunet_deploy.segmenter import Segmenter

        params = json.loads(args["model_config"]).get("parameters", {})
        self.segmenter = Segmenter(ModelSpec.from_dict(json.loads(params["spec"]["string_value"])))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "raw").as_numpy()
                image, size = self.segmenter.pad(self.segmenter.prepare(raw, "raw"))
                sizes = np.tile(np.array([size], dtype=np.int32), (len(image), 1))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("image", np.ascontiguousarray(image)), pb_utils.Tensor("size", sizes)]))
            except Exception as exc:  # one bad request is that request's error, never the model's death
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500])))
        return responses
