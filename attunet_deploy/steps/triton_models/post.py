"""Triton python model ``attunet_post``: crop logits back to the input size and turn them into masks.

Inputs: ``logits`` float32 [N, K, H', W'], ``size`` int32 [N, 2]. Output: ``mask`` uint8 [N, H, W]
by the bundle's post-processing. The work is the package's own Segmenter (shipped beside this file).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        sys.path.insert(0, os.path.join(args["model_repository"], args["model_version"]))
        from attunet_deploy.bundle.spec import ModelSpec
        from attunet_deploy.segmenter import Segmenter

        params = json.loads(args["model_config"]).get("parameters", {})
        self.segmenter = Segmenter(ModelSpec.from_dict(json.loads(params["spec"]["string_value"])))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy()
                size = pb_utils.get_input_tensor_by_name(request, "size").as_numpy()
                masks = self.segmenter.masks(self.segmenter.crop(np.asarray(logits, np.float32),
                                                                 tuple(int(v) for v in size[0])))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("mask", np.ascontiguousarray(masks))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)[:500])))
        return responses
