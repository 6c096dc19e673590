"""Loaders: things that BUILD artifacts (ONNX export, quantised graphs, TensorRT engines)."""
