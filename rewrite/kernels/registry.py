"""Per-backend lowerings of the `rewrite::` custom ops, registered next to each op.

- `ONNX_TRANSLATIONS`: {torch op overload: onnxscript function} for the exporter's
  custom translation table.
- `ONNX_POSTPROCESS`: functions `(onnx.ModelProto, OnnxExportSpec) -> None` run after export,
  for nodes that must be built by hand (onnxruntime contrib ops have no onnx schema); the
  spec carries the user's lowering options.
- `TVM_CONVERTERS`: {op name: converter} for TVM Relax import (filled by the TVM backend's ops).
"""
from __future__ import annotations

from typing import Any, Callable

ONNX_TRANSLATIONS: dict[Any, Callable] = {}
ONNX_POSTPROCESS: list[Callable[[Any, Any], None]] = []
TVM_CONVERTERS: dict[str, Callable] = {}


def load_all() -> None:
    """Import every op module so that its registrations run."""
    import importlib
    import pkgutil

    import rewrite.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in {"registry"} and not info.name.startswith("_"):
            importlib.import_module(f"rewrite.kernels.{info.name}")
