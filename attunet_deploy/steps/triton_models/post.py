"""Triton python model ``attunet_post``: crop logits back to the input size and turn them into masks.

Inputs: ``logits`` float32 [N, K, H', W'], ``size`` int32 [N, 2]. Output: ``mask`` uint8 [N, H, W]:
sigmoid > threshold for one channel, argmax otherwise. Mirrors attunet_deploy.preprocess.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.post = json.loads(params["postprocessing"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy()
            size = pb_utils.get_input_tensor_by_name(request, "size").as_numpy()
            h, w = int(size[0][0]), int(size[0][1])
            logits = logits[..., :h, :w]
            if self.post.get("kind") == "argmax":
                mask = np.argmax(logits, axis=1).astype(np.uint8)
            else:
                t = float(self.post.get("threshold", 0.5))
                mask = (logits[:, 0] > np.log(t / (1.0 - t))).astype(np.uint8)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("mask", np.ascontiguousarray(mask))]))
        return responses
