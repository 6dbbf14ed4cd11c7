"""Capture: torch.export (non-strict, dynamic batch/sequence dims) -> an unlifted GraphModule.

When capture fails we say which module was running and which source line of the model
raised, and suggest a fix, instead of surfacing torch.export's traceback.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import re
import traceback
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from .errors import CaptureError
from .inputs import Inputs, dim_names  # dim_names re-exported: the dims capture keeps dynamic

_TORCH_DIR = os.path.dirname(torch.__file__)


def _dynamic_axes(x: torch.Tensor) -> list[int]:
    """Batch and (for token-like inputs) sequence: the dims capture keeps dynamic."""
    names = dim_names(x.is_floating_point(), x.dim())
    return [d for d, n in names.items() if n in ("batch_size", "sequence_length")]


def dynamic_shapes_for(inputs: Inputs, dynamic: Any = True) -> Any:
    """Dynamic dims per input: batch (dim 0) always, sequence (dim 1) for token-like inputs.

    Token-like: integer tensors of rank >= 2 (ids, masks) and float tensors of rank 3
    (B, S, H embeddings). Images (B, C, H, W) keep only the batch dimension dynamic.
    `dynamic` may instead be a policy object with `dynamic_shapes(inputs)` (a generation
    graph's KV-cache dims, `rewrite.generation.GenerationShapes`); it travels as
    `Program.dynamic`, so every recapture and backend export uses it.
    `Dim.AUTO` lets torch.export decide which of them are equal (input_ids and attention_mask
    share the sequence symbol when the model adds them); the ONNX backend names them
    (`backends.onnx.name_interface`).
    """
    if callable(getattr(dynamic, "dynamic_shapes", None)):
        return dynamic.dynamic_shapes(inputs)

    def spec_for(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not dynamic or x.dim() == 0:
            return None
        return {d: Dim.AUTO for d in _dynamic_axes(x)}

    args = tuple(pytree.tree_map(spec_for, a) if not isinstance(a, torch.Tensor) else spec_for(a) for a in inputs.args)
    kwargs = {k: (spec_for(v) if isinstance(v, torch.Tensor) else pytree.tree_map(spec_for, v)) for k, v in inputs.kwargs.items()}
    if inputs.kwargs and not inputs.args:
        return kwargs
    if inputs.args and not inputs.kwargs:
        return args
    return tuple(args) + tuple(kwargs.values())  # mixed: in the order of the inputs


def widen_for_capture(inputs: Inputs, dynamic: Any = True) -> Inputs:
    """Size-1 batch or sequence dims would be specialised by export: repeat them to 2."""
    if not dynamic:
        return inputs

    def widen(x: torch.Tensor) -> torch.Tensor:
        for d in _dynamic_axes(x):
            if x.shape[d] == 1:
                x = torch.cat([x, x], dim=d)
        return x

    return inputs.map(widen)


def export_program(module: torch.nn.Module, inputs: Inputs, dynamic: Any = True) -> torch.export.ExportedProgram:
    """torch.export the module non-strictly with dynamic dims; errors become CaptureError."""
    example = widen_for_capture(inputs, dynamic)
    shapes = dynamic_shapes_for(example, dynamic) if dynamic else None
    with _module_tracker(module) as stack:
        try:
            return torch.export.export(module, example.args, example.kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one explained error
            raise CaptureError(_explain_failure(module, exc, list(stack))) from exc


def capture(module: torch.nn.Module, inputs: Inputs, dynamic: Any = True) -> torch.fx.GraphModule:
    """The unlifted GraphModule of ATen ops, called exactly like `module`."""
    was_training = module.training
    _set_training(module, False)
    try:
        with torch.no_grad(), exportable_experts(module):
            ep = export_program(module, inputs, dynamic)
    finally:
        _set_training(module, was_training)
    # a shape policy may turn off the unlifted module's input guards (see GenerationShapes)
    gm = ep.module(check_guards=getattr(dynamic, "check_guards", True))
    if callable(getattr(dynamic, "relax", None)):  # a policy may widen the traced input ranges
        dynamic.relax(gm)
    return gm


EXPORTABLE_EXPERTS = "batched_mm"
"""The transformers mixture-of-experts implementation capture switches to: it gathers each
token's expert weights and runs one batched matmul, plain ATen ops that every backend lowers.
The default `grouped_mm` sorts tokens by expert and calls an opaque custom op (a Python loop
over experts on CPU) that the ONNX exporter and TVM cannot lower; `eager` loops over experts
with data-dependent shapes."""


@contextlib.contextmanager
def exportable_experts(module: torch.nn.Module) -> Iterator[None]:
    """Capture transformers MoE models with `EXPORTABLE_EXPERTS`, restoring their setting after.

    Uses the models' own config-level switch (`set_experts_implementation`), so it applies to
    every transformers MoE architecture and to wrappers holding one; the numbers are the same,
    only the kernel differs. Modules without the switch are untouched.
    """
    switched: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    for sub in module.modules():
        get, set_ = getattr(sub, "get_experts_implementation", None), getattr(sub, "set_experts_implementation", None)
        if id(getattr(sub, "config", None)) in seen or not callable(get) or not callable(set_):
            continue
        seen.add(id(sub.config))
        try:
            current = get()
        except Exception:  # noqa: BLE001 - a model without experts may not answer
            continue
        if any(v not in (None, EXPORTABLE_EXPERTS, "eager") for v in current.values()) and \
                getattr(sub, "_can_set_experts_implementation", lambda: False)():
            set_(EXPORTABLE_EXPERTS)
            switched.append((sub, current))
    try:
        yield
    finally:
        for sub, current in reversed(switched):
            sub.set_experts_implementation(current)


def _set_training(module: torch.nn.Module, mode: bool) -> None:
    """eval()/train(); modules from ep.module() refuse the call but are already in eval form."""
    try:
        module.train(mode)
    except NotImplementedError:
        pass


@contextlib.contextmanager
def _module_tracker(root: torch.nn.Module) -> Iterator[list[str]]:
    """Keep a stack of the module paths currently executing (left intact on an exception)."""
    stack: list[str] = []
    handles = []
    names = {id(m): n for n, m in root.named_modules()}

    def pre(mod, _args):
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, _args, _out):
        if stack:
            stack.pop()

    for mod in root.modules():
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _user_frame(exc: BaseException) -> tuple[str, int, str] | None:
    """The innermost traceback frame outside torch itself: the model's own code."""
    found = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            if frame.filename.startswith(_TORCH_DIR) or "/rewrite/" in frame.filename:
                continue
            found = (frame.filename, frame.lineno or 0, (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip())
    return found


def _chain(exc: BaseException) -> list[BaseException]:
    out, cur = [], exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return list(reversed(out))


def _explain_failure(root: torch.nn.Module, exc: Exception, stack: list[str]) -> str:
    text = f"{type(exc).__name__}: {exc}"
    where_module = stack[-1] if stack else ""
    mod_type = ""
    if where_module:
        with contextlib.suppress(AttributeError):
            mod_type = type(root.get_submodule(where_module)).__name__
    frame = _user_frame(exc)
    where = f"module '{where_module or '<root>'}'" + (f" ({mod_type})" if mod_type else "")
    if frame:
        where += f", {frame[0]}:{frame[1]}: {frame[2]}"
    lowered = text.lower()
    if "data-dependent" in lowered or "guardondatadependent" in lowered or "could not guard on data-dependent" in lowered:
        hint = ("control flow or a shape depends on tensor values. Rewrite it with torch.where / "
                "torch.cond, or move the branch out of forward (decide it from the config), "
                "or pass example inputs for which the branch is fixed.")
    elif "not a known type" in lowered or "register a pytree" in lowered:
        hint = ("the model returns or takes an object torch.export cannot flatten. Return tensors, "
                "tuples, dicts or dataclasses; for transformers models set use_cache=False "
                "(a DynamicCache output cannot be captured), or for a causal LM compile with "
                "task='text-generation' (a graph with the KV cache as tensors).")
    elif "constraint" in lowered or "specializ" in lowered:
        hint = ("a dynamic dimension was forced to a constant. Pass dynamic=False to compile "
                "(static shapes), or remove the code that fixes the size.")
    elif "unsupported" in lowered or "not implemented" in lowered:
        hint = "an operator cannot be traced. Replace it with a torch operator or wrap it in a torch.library custom op."
    else:
        hint = "check that the model runs on the example inputs in eval mode; make the failing module a plain torch computation."
    cause = "; ".join(exception_summary(exc, limit=3)) or type(exc).__name__
    return f"cannot capture the model with torch.export: {cause}; where: {where}; fix: {hint}"


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s+(?P<code>[^\n]*)')


def source_line(node: torch.fx.Node) -> str | None:
    """`file:line: code` of the innermost frame outside torch that made this graph node."""
    trace = node.meta.get("stack_trace") or ""
    found = None
    for m in _FRAME.finditer(trace):
        if not m.group("file").startswith(_TORCH_DIR):
            found = f"{m.group('file')}:{m.group('line')}: {m.group('code').strip()}"
    return found


def exception_summary(exc: BaseException, limit: int = 6) -> list[str]:
    """`Type: first line` of each exception in the chain, innermost (the cause) first, deduplicated.

    torch.onnx wraps the cause in a ConversionError whose own first line only says that
    conversion failed; the line that explains it is further down the chain (or in the
    wrapper's "Exception summary" section).
    """
    lines: list[str] = []
    for e in _chain(exc):
        text = _ANSI.sub("", str(e)).strip()
        summary = re.findall(r"^<class '([\w.]+)'>: (.+)$", text, flags=re.MULTILINE)
        entries = [(cls.rsplit(".", 1)[-1], msg) for cls, msg in summary] if summary else [(type(e).__name__, text.splitlines()[0] if text else "")]
        for name, msg in entries:
            line = f"{name}: {msg.strip()}"[:500]
            if msg and line not in lines and not _is_wrapper_message(msg):
                lines.append(line)
    return lines[:limit]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _is_wrapper_message(msg: str) -> bool:
    """torch.onnx's generic 'step 3/3' banner, which says nothing about the cause."""
    return msg.startswith("Failed to convert the exported program") or msg.startswith("Failed to decompose the FX graph")
