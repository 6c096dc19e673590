"""Builders: pure functions, artifact in -> artifact out (ONNX export, FP16, INT8 and its accuracy
search, TensorRT engines, the TensorRT lint). No bundle or transaction inside: ``steps`` does that."""
