"""Per-backend lowerings of the `rewrite::` custom ops, registered by one decorator keyed by the op.

Each op lives in its own package (`rewrite/kernels/<op family>/`): the package module holds the
reference (plain torch, defines the numerics) and fake (shapes) implementations, `onnx_lowering`
its ONNX lowering and `tvm_kernel` its TVM kernel. A lowering registers itself next to its code:

    @lowering("rewrite::token_select", "onnx")
    def token_select_onnx(scores, keep, keep_first, keep_last): ...

The backends read what they need through one lookup per backend, after `load_all()`:
- `onnx_translations()`: {torch op overload: onnxscript function} for the exporter's custom
  translation table;
- `onnx_postprocess()`: functions `(onnx.ModelProto, OnnxExportSpec) -> None` run after export,
  for nodes that must be built by hand (onnxruntime contrib ops have no onnx schema); the spec
  carries the user's lowering options. Registered with `@postprocess("onnx")`;
- `tvm_converters()`: {op overload name, e.g. "linear_q.default": converter} for TVM Relax import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

Backend = Literal["onnx", "tvm"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Kernel:
    """What the backends know of one custom op: its lowering per backend."""

    op: str
    """Qualified op name, `namespace::name` as `torch.library.custom_op` defines it."""
    lowerings: dict[str, Callable[..., Any]] = field(default_factory=dict)

    @property
    def overload(self) -> Any:
        """The op's default overload (`torch.ops.<namespace>.<name>.default`), the exporter's key."""
        import torch

        namespace, name = self.op.split("::")
        return getattr(getattr(torch.ops, namespace), name).default

    @property
    def overload_name(self) -> str:
        """`<name>.default`: how an exported graph's node names its target (the TVM importer's key)."""
        return f"{self.op.split('::')[1]}.default"


KERNELS: dict[str, Kernel] = {}
POSTPROCESS: dict[str, list[Callable[..., None]]] = {}


def lowering(op: str, backend: Backend) -> Callable[[F], F]:
    """Decorator: register the function as `op`'s lowering for `backend` (one per op and backend)."""
    if "::" not in op:
        raise ValueError(f"kernel registry: op {op!r} must be qualified as 'namespace::name'")

    def register(fn: F) -> F:
        kernel = KERNELS.setdefault(op, Kernel(op))
        old = kernel.lowerings.get(backend)
        if old is not None and old.__qualname__ != fn.__qualname__:  # a re-import registers the same function again
            raise ValueError(f"kernel registry: {op} already has a {backend} lowering ({old.__qualname__})")
        kernel.lowerings[backend] = fn
        return fn

    return register


def postprocess(backend: Literal["onnx"]) -> Callable[[F], F]:
    """Decorator: register a step run on every exported model of `backend` (after its lowerings)."""

    def register(fn: F) -> F:
        steps = POSTPROCESS.setdefault(backend, [])
        if all(s.__qualname__ != fn.__qualname__ or s.__module__ != fn.__module__ for s in steps):
            steps.append(fn)
        return fn

    return register


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """{torch op overload: onnxscript function} of every op with an ONNX lowering."""
    return {k.overload: k.lowerings["onnx"] for k in KERNELS.values() if "onnx" in k.lowerings}


def onnx_postprocess() -> list[Callable[..., None]]:
    """The registered post-export steps of ONNX models, in registration order."""
    return list(POSTPROCESS.get("onnx", []))


def tvm_converters() -> dict[str, Callable[..., Any]]:
    """{op overload name: Relax converter} of every op with a TVM kernel."""
    return {k.overload_name: k.lowerings["tvm"] for k in KERNELS.values() if "tvm" in k.lowerings}


def load_all() -> None:
    """Import every kernel module (each op package and its lowerings) so that its registrations run."""
    import importlib
    import pkgutil

    import rewrite.kernels as package

    for info in pkgutil.walk_packages(package.__path__, prefix="rewrite.kernels."):
        if info.name != __name__ and not info.name.rpartition(".")[2].startswith("_"):
            importlib.import_module(info.name)
