"""Triton python model ``attunet_cpu``: the bundle's ONNX graph on ONNX Runtime CPU inside Triton,
for servers without the onnxruntime backend (or a GPU). Input ``image``, output ``logits``, as
the ``attunet_<precision>`` models; H and W must already be multiples of the divisor."""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        graph = params.get("graph", {}).get("string_value", "model.onnx")
        threads = int(params.get("intra_op_threads", {}).get("string_value", "0"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        path = os.path.join(args["model_repository"], args["model_version"], graph)
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # Requests that dynamic batching put together are run as one batch per image shape.
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy().astype(np.float32) for r in requests]
        groups = {}
        for i, x in enumerate(images):
            groups.setdefault(x.shape[1:], []).append(i)
        outputs = [None] * len(images)
        for idx in groups.values():
            logits = self.session.run(["logits"], {"image": np.concatenate([images[i] for i in idx])})[0]
            start = 0
            for i in idx:
                n = len(images[i])
                outputs[i] = np.ascontiguousarray(logits[start:start + n])
                start += n
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("logits", y)]) for y in outputs]
