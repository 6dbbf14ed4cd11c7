"""TVM targets (the helper lives in kernels/tvm_target.py, below both the kernels and this backend)."""
from rewrite.kernels.tvm_target import GPU_KINDS, TargetError, cuda_arch, device_for, is_gpu, make_target, vector_lanes

__all__ = ["GPU_KINDS", "TargetError", "cuda_arch", "device_for", "is_gpu", "make_target", "vector_lanes"]
