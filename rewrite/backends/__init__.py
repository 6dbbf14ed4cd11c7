"""Backends: lower a rewritten Program to ONNX (verified in onnxruntime), TVM, or keep torch."""
