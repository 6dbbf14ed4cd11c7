"""Custom ops of rewritten graphs (torch.library, namespace `rewrite::`) and their kernels.

Each op has a reference implementation (plain torch, defines the numerics), a fake
implementation (shapes), and one lowering per backend kept next to it (ONNX, TVM).
"""
