"""TVM targets from short names: the one helper both the kernels and the TVM backend need.

It lives below both (kernels never import a backend): `make_target("llvm")` is this CPU with
its own feature set (so LLVM emits AVX-512 where the CPU has it), `make_target("cuda")` is the
local GPU's architecture, else sm_90 (code generation needs no GPU).
"""
from __future__ import annotations

import json
import os
from typing import Any

GPU_KINDS = ("cuda", "rocm", "vulkan", "metal", "opencl")


class TargetError(ValueError):
    """A target that cannot be made from what was given."""


def make_target(target: Any = "llvm") -> Any:
    """A tvm.target.Target from "llvm"/"cpu", "cuda"/"gpu", a JSON string, a dict, or a Target."""
    import tvm
    from tvm.target import codegen

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        name = target.strip()
        if name in ("llvm", "cpu"):
            return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
        if name in ("cuda", "gpu"):
            return make_target({"kind": "cuda"})
        if name.startswith("{"):
            return make_target(json.loads(name))
        return tvm.target.Target(name)
    if isinstance(target, dict):
        cfg = dict(target)
        if cfg.get("kind") == "cuda":
            cfg.setdefault("arch", cuda_arch())
            cfg.setdefault("max_shared_memory_per_block", 49152)  # every arch since sm_20 (static shared memory)
        if cfg.get("kind") == "llvm" and "mcpu" not in cfg:
            cfg["mcpu"] = codegen.llvm_get_system_cpu()
        return tvm.target.Target(cfg)
    raise TargetError(f"cannot make a TVM target from {target!r}: give 'llvm', 'cuda' or a target dict like "
                      "{'kind': 'cuda', 'arch': 'sm_90'}")


def cuda_arch() -> str:
    """The local GPU's compute capability (TVM's runtime, else torch's), else sm_90."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # noqa: BLE001 - a TVM wheel without CUDA
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001
        pass
    return "sm_90"


def is_gpu(target: Any) -> bool:
    return make_target(target).kind.name in GPU_KINDS


def device_for(target: Any) -> Any:
    """The TVM device a build for `target` runs on (device 0); on CPU, with `cpu_threads` threads."""
    import tvm

    kind = make_target(target).kind.name
    if kind == "llvm":
        configure_cpu_threads()
        return tvm.cpu(0)
    return tvm.device(kind, 0)


def physical_cores() -> int:
    """CPUs this process may run on, SMT siblings counted once (Linux topology; else all CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


_THREADS: list[int] = []


def configure_cpu_threads() -> int:
    """Size TVM's CPU thread pool to this machine's physical cores, once per process.

    Without TVM_NUM_THREADS (or OMP_NUM_THREADS), TVM's runtime takes half the logical CPUs
    on x86, assuming two SMT threads per core; on a VM whose vCPUs are separate cores (2 vCPUs,
    1 thread per core here) that halves the parallelism (measured: TVM ran every kernel on one
    thread while onnxruntime used two). An explicit TVM_NUM_THREADS or OMP_NUM_THREADS wins.
    """
    if _THREADS:
        return _THREADS[0]
    explicit = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    n = int(explicit) if explicit and explicit.isdigit() else physical_cores()
    if not explicit:
        import tvm

        os.environ["TVM_NUM_THREADS"] = str(n)  # read when the pool starts
        config = tvm.get_global_func("runtime.config_threadpool", True)
        if config is not None:  # a pool already started keeps its size: restart it (mode 1: TVM's default)
            config(1, n)
    _THREADS.append(n)
    return n


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target CPU's widest vector register (16 with AVX-512, 8 with AVX2)."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(make_target(target)))
    except Exception:  # noqa: BLE001 - not an llvm target, or an older TVM
        bits = 256
    return max(4, bits // 32)
