"""PrimFunc attributes that mark our generated kernels, shared by the kernels and their scheduler.

A kernel carries `KERNEL_ATTR` (its name); quantized kernels also `BITS_ATTR` and `GROUP_ATTR`,
which the scheduler (`tvm_schedule`) reads to pick and parameterise the kernel's schedule. Kept in
a module of their own so a kernel and the scheduler share one spelling without importing each other.
"""
from __future__ import annotations

KERNEL_ATTR = "rewrite.kernel"
BITS_ATTR = "rewrite.bits"
GROUP_ATTR = "rewrite.group_size"
