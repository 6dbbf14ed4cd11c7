"""Custom ops of rewritten graphs (torch.library, namespace `rewrite::`) and their kernels.

One package per op family (`quant`, `token`): the package module holds each op's reference
implementation (plain torch, defines the numerics) and fake implementation (shapes); its
`onnx_lowering` and `tvm_kernel` modules hold the backends' lowerings, each registered by one
decorator keyed by the op (`registry.lowering`). The `tvm_*` modules and `cuda_runtime` are the
shared TVM infrastructure (target, schedules, CUDA runtime) that every op's kernel goes through.
"""
