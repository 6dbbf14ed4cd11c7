"""kernels.registry: one package per custom op, lowerings registered by one decorator keyed by the op."""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch._library.custom_ops import CustomOpDef

import rewrite.kernels as kernels
from rewrite.kernels import registry


def _defined_ops() -> set[str]:
    """Qualified names of every `rewrite::` custom op defined in the kernel packages."""
    registry.load_all()
    ops = set()
    for info in pkgutil.walk_packages(kernels.__path__, prefix="rewrite.kernels."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, CustomOpDef) and value._qualname.startswith("rewrite::"):
                ops.add(value._qualname)
    return ops


def test_every_op_has_an_onnx_lowering_in_its_own_package():
    ops = _defined_ops()
    assert {"rewrite::linear_q", "rewrite::token_select"} <= set(ops)
    for op in ops:
        kernel = registry.KERNELS.get(op)
        assert kernel is not None and "onnx" in kernel.lowerings, f"{op} has no ONNX lowering"
        for backend, fn in kernel.lowerings.items():  # lowerings live in the op's package, next to its definition
            package = importlib.import_module(fn.__module__.rpartition(".")[0])
            assert any(isinstance(v, CustomOpDef) and v._qualname == op for v in vars(package).values()), \
                f"{op}'s {backend} lowering {fn.__module__} is not in the package that defines the op"


def test_backend_tables_are_keyed_by_the_op():
    registry.load_all()
    onnx = registry.onnx_translations()
    tvm = registry.tvm_converters()
    assert onnx[torch.ops.rewrite.linear_q.default] is registry.KERNELS["rewrite::linear_q"].lowerings["onnx"]
    assert tvm["token_select.default"] is registry.KERNELS["rewrite::token_select"].lowerings["tvm"]
    assert set(tvm) == {k.overload_name for k in registry.KERNELS.values() if "tvm" in k.lowerings}
    assert len(registry.onnx_postprocess()) == 1  # the quantized ops' placeholder expansion, registered once


def test_a_second_lowering_for_the_same_op_and_backend_is_refused():
    registry.load_all()

    def other(*args):  # a different function than the registered one
        return None

    with pytest.raises(ValueError, match="already has a onnx lowering"):
        registry.lowering("rewrite::token_select", "onnx")(other)
    with pytest.raises(ValueError, match="namespace::name"):
        registry.lowering("token_select", "onnx")
