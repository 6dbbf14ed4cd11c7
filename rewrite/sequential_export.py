"""ONNX export of a checkpoint folder in bounded memory (the sequential pipeline's output, or any HF folder).

It sits in the driver layer beside `rewrite.sequential` (it reads that pipeline's output
format and uses the ONNX backend's helpers). `backends.onnx.export_onnx` builds the whole ONNX model in memory (graph plus every weight)
and serialises it: for a 7B model that is the float graph several times over. Here the
weights never meet in memory:

1. capture: the model is built on the meta device (`rewrite.load_rewritten` for a folder
   written by `quantize_sequential`: every quantized linear is a `PackedLinear`, so the graph
   carries `rewrite::linear_q`; `rewrite.load_hf` otherwise) and every weight becomes a fake
   tensor (shape and dtype, no storage). torch.export and the torch.onnx exporter run on that:
   the graph is exact, its initializers have no bytes. Floating weights are declared float32
   (the precision the graph computes in), integer ones (packed codes, zero points) keep
   their dtype, so packed weights stay packed.
2. placeholders: the quantized-op placeholders are expanded by `kernels.quant.onnx_lowering.expand_placeholders`
   with a lazy constant source (each packed tensor read from the checkpoint when its node
   asks), and the initializers each expansion makes (MatMulNBits' B, scales, zero points)
   are appended to the external-data file at once: one linear's tensors in memory at a time.
3. the remaining weights (norms, embeddings, float linears) are streamed from the
   checkpoint into the same file in row chunks, converted to float32 on the way, except large
   bf16/fp16 lookup tables, which keep the checkpoint's dtype (`keep_tables_narrow`); a tied
   weight (an lm_head sharing the embedding) is written once and referenced by both names.
4. the model file itself holds only the graph (`location`/`offset`/`length` per weight), so
   neither it nor the data file meets protobuf's 2 GB limit; the data file may be any size.

`verify` runs the written file in onnxruntime on a few tokens (under `BOUNDED_SESSION_CONFIG`,
the arena off: the file's weights memory-mapped, never copied) and compares its logits with
the torch model run on the same checkpoint one module at a time (each module's weights read
before it runs and freed after it).
"""
from __future__ import annotations

import collections
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, _set_tensor, load_hf
from .errors import ExportError
from .inputs import Inputs
from .progress import note, showing
from .sequential import MemoryMeter, Phase, load_rewritten, peak_rss_mb, phases_table, return_freed_memory

INLINE_BYTES = 1024
"""Initializers up to this size stay in the model file (shape constants); larger ones go to the data file."""
ALIGN = 4096
"""Offsets of large tensors in the data file are page-aligned, so onnxruntime can map them."""
CHUNK_ELEMENTS = 1 << 22
"""Weights are converted and written in row chunks of about this many elements (16 MB as float32)."""
TABLE_BYTES = 1 << 26
"""Float weights of at least this many bytes (as float32) that are only looked up (Gather) or
multiplied by (a transposed MatMul operand: a tied lm_head) stay in the checkpoint's 16-bit dtype
in the file (`keep_tables_narrow`)."""
TABLE_CHUNK_ELEMENTS = 1 << 23
"""A kept-narrow table used as a MatMul operand is cast to float32 this many elements at a time (32 MB)."""
BOUNDED_SESSION_CONFIG = {"session.disable_prepacking": "1",
                          "optimization.disable_specified_optimizers": "ConstantFolding"}
"""onnxruntime session settings under which the streamed file runs in about its own size: the
external data is memory-mapped (page-aligned offsets), prepacking would copy every constant
MatMul/MatMulNBits operand into a second layout, and constant folding would turn a kept-narrow
table's casts back into one float32 copy (1 GB for a 128k x 2048 table); the memory arena is off
too (`verify_file`), so a run's transients (a chunk, a dequantized MatMulNBits operand) are
returned rather than kept. Measured on the 1B-size model with 2 blocks, onnxruntime alone: 3.36 GB
over its start with its defaults, 0.67 GB with these settings (benchmarks/scale.py has the whole run)."""


# ----------------------------------------------------------------------------- the result
@dataclass
class StreamedExport:
    """What `export_checkpoint` wrote and what it cost."""

    path: Path
    data_path: Path
    bytes: int                      # model file + data file
    phases: list[Phase]
    verified: bool = False
    max_abs_error: float | None = None
    rel_error: float | None = None
    cosine: float | None = None
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.phases)

    def table(self) -> str:
        return phases_table(self.phases)


# ----------------------------------------------------------------------------- 1. fake weights
def open_folder(directory: str | Path) -> Checkpoint:
    """A folder written by `quantize_sequential` (packed linears) or a plain HF checkpoint folder, on meta."""
    directory = Path(directory)
    return load_rewritten(directory) if (directory / "quantization.json").is_file() else load_hf(directory)


def fake_weights(model: nn.Module) -> dict[str, torch.dtype]:
    """Replace every meta parameter and buffer by a fake CPU tensor (no storage); name -> declared dtype.

    Floating tensors are declared float32, the precision the exported graph computes in; the
    others (packed codes, zero points) keep their dtype.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    declared: dict[str, torch.dtype] = {}
    done: dict[int, torch.Tensor] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t is None or t.device.type != "meta":
            continue
        dtype = torch.float32 if t.dtype.is_floating_point else t.dtype
        if id(t) not in done:  # a tied parameter stays one tensor
            with mode:
                fake = torch.empty(t.shape, dtype=dtype)
            done[id(t)] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake
        _set_tensor(model, name, done[id(t)])
        declared[name] = dtype
    return declared


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(getattr(value, "raw", None), FakeTensor)


def example_for(ckpt: Checkpoint, tokens: int) -> Inputs:
    """`tokens` token ids spread over the vocabulary (and an all-ones mask): the export example and the check."""
    config = ckpt.config
    text = getattr(config, "get_text_config", lambda: config)()
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        raise ExportError(f"{type(ckpt.model).__name__}: the streamed ONNX export makes token-id inputs from the "
                          "config's vocab_size, which it lacks; export a model that fits with rewrite.compile")
    ids = (torch.arange(tokens) * 7919 + 1).remainder(vocab).unsqueeze(0)
    return Inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def capture_graph(ckpt: Checkpoint, example: Inputs, opset: int) -> tuple[Any, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """(ModelProto without the fake weights, {initializer name: (dtype, shape)} of the weights left out)."""
    import logging

    from rewrite.kernels import registry
    from .capture import export_program

    from rewrite.backends.onnx import _quiet, explain_export_failure, name_interface, strip_debug_metadata

    registry.load_all()
    model = ckpt.model
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    fake_weights(model)
    with torch.no_grad():
        ep = export_program(model, example, True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with _quiet():
            # optimize=False: the optimizer folds constants, which fake weights do not have
            program = torch.onnx.export(ep, dynamo=True, opset_version=opset, verbose=False, optimize=False,
                                        custom_translation_table=registry.onnx_translations() or None)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(explain_export_failure(exc, ep)) from exc
    graph = program.model.graph
    pending: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if _is_fake(value.const_value):
            raw = value.const_value.raw
            pending[name] = (raw.dtype, tuple(raw.shape))
            graph.initializers.pop(name)
    proto = program.model_proto
    strip_debug_metadata(proto)
    names = _output_names(ep)
    if names is not None and len(names) == len(proto.graph.output):
        name_interface(proto, None, names)
    return proto, pending


def _output_names(ep: Any) -> list[str] | None:
    """`logits`, ...: the output structure's keys (as `backends.onnx.output_names` names them)."""
    from rewrite.backends.onnx import names_of_outputs

    spec = getattr(ep.call_spec, "out_spec", None)
    return None if spec is None else names_of_outputs(spec)


# ----------------------------------------------------------------------------- 2. large tables in their own dtype
def keep_tables_narrow(proto: Any, ckpt: Checkpoint, pending: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Keep large lookup tables in the checkpoint's bf16/fp16 instead of float32; the names kept.

    A tied 128k x 2048 embedding is 1 GB as float32, 0.5 GB as stored. A weight qualifies when
    it is floating, stored in 16 bits, at least `TABLE_BYTES` as float32, and every node reading
    it is a Gather of its rows (then the gathered rows are cast to float32: a lookup copies
    values, so the result is exactly the float32 model's) or a Transpose feeding a MatMul's
    weight operand (the lm_head tied to the embedding: rewritten as `TABLE_CHUNK_ELEMENTS`
    slices, each cast to float32, transposed and multiplied, the products concatenated, so
    the same float32 products as before with one chunk in float32 at a time). `pending`'s dtype
    of a kept name becomes the stored one, which `write_weights` writes.
    """
    from onnx import TensorProto, helper

    from onnx import NodeProto

    graph_nodes: list[Any] = []            # own copies: protobuf wrappers are not stable objects
    for node in proto.graph.node:
        graph_nodes.append(NodeProto())
        graph_nodes[-1].CopyFrom(node)
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph_nodes:
        for x in node.input:
            consumers[x].append(node)
    outputs = {o.name for o in proto.graph.output}
    kept: list[str] = []
    for name, (dtype, shape) in list(pending.items()):
        if name not in ckpt.store or dtype != torch.float32 or len(shape) != 2:
            continue
        stored = ckpt.store.dtype(name)
        if stored not in (torch.bfloat16, torch.float16) or shape[0] * shape[1] * 4 < TABLE_BYTES:
            continue
        users = consumers.get(name, [])
        if not users or name in outputs:
            continue

        def matmul_of(t: Any) -> Any:
            if t.op_type != "Transpose" or t.input[0] != name or list(_attr(t, "perm") or []) != [1, 0]:
                return None
            mm = consumers.get(t.output[0], [])
            ok = len(mm) == 1 and mm[0].op_type == "MatMul" and list(mm[0].input).index(t.output[0]) == 1
            return mm[0] if ok and t.output[0] not in outputs else None

        gathers = [n for n in users if n.op_type == "Gather" and n.input[0] == name and (_attr(n, "axis") or 0) == 0]
        transposes = [n for n in users if matmul_of(n) is not None]
        if len(gathers) + len(transposes) != len(users):
            continue
        onnx_to = _onnx_dtype(torch.float32)
        replace: dict[int, list[Any]] = {}
        for g in gathers:
            narrow = g.output[0] + "_narrow"
            cast = helper.make_node("Cast", [narrow], [g.output[0]], to=onnx_to, name=f"{g.name}_to_float")
            g.output[0] = narrow
            replace[id(g)] = [g, cast]
        step = max(1, TABLE_CHUNK_ELEMENTS // shape[1])
        for t in transposes:
            mm = matmul_of(t)
            x, y = mm.input[0], mm.output[0]
            base = mm.name or (y + "_mm")
            nodes, parts = [], []
            for c, a in enumerate(range(0, shape[0], step)):
                b = min(a + step, shape[0])
                starts, ends, axes = (f"{base}_chunk{c}_{k}" for k in ("starts", "ends", "axes"))
                for n, v in ((starts, a), (ends, b), (axes, 0)):
                    proto.graph.initializer.append(helper.make_tensor(n, TensorProto.INT64, [1], [v]))
                sl, fl, tr, out = (f"{base}_chunk{c}_{k}" for k in ("rows", "float", "t", "out"))
                nodes += [helper.make_node("Slice", [name, starts, ends, axes], [sl], name=sl),
                          helper.make_node("Cast", [sl], [fl], to=onnx_to, name=fl),
                          helper.make_node("Transpose", [fl], [tr], perm=[1, 0], name=tr),
                          helper.make_node("MatMul", [x, tr], [out], name=out)]
                parts.append(out)
            nodes.append(helper.make_node("Concat", parts, [y], axis=-1, name=f"{base}_concat"))
            replace[id(t)] = []
            replace[id(mm)] = nodes
        graph_nodes = [m for node in graph_nodes for m in replace.get(id(node), [node])]
        consumers = collections.defaultdict(list)
        for node in graph_nodes:
            for x in node.input:
                consumers[x].append(node)
        pending[name] = (stored, shape)
        kept.append(name)
    if kept:
        del proto.graph.node[:]
        proto.graph.node.extend(graph_nodes)
    return kept


def _attr(node: Any, name: str) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


# ----------------------------------------------------------------------------- 3. the data file
class DataFile:
    """The external-data file, appended to tensor by tensor; each TensorProto becomes a reference into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0
        self.written: dict[str, tuple[int, int]] = {}    # source key -> (offset, length): tied weights once

    def _align(self, nbytes: int) -> None:
        if nbytes >= ALIGN and self.offset % ALIGN:
            pad = ALIGN - self.offset % ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad

    def refer(self, tensor: Any, offset: int, length: int) -> None:
        from onnx import TensorProto

        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def stream(self, key: str, chunks: Iterator[bytes], nbytes: int) -> tuple[int, int]:
        """Append `nbytes` given in chunks (once per key); (offset, length)."""
        if key in self.written:
            return self.written[key]
        self._align(nbytes)
        start = self.offset
        for chunk in chunks:
            self.file.write(chunk)
            self.offset += len(chunk)
        if self.offset - start != nbytes:
            raise ExportError(f"{key}: wrote {self.offset - start} bytes, expected {nbytes}")
        self.written[key] = (start, nbytes)
        return self.written[key]

    def emit(self, tensors: list[Any]) -> None:
        """Move the bytes of freshly built initializers (above `INLINE_BYTES`) into the file."""
        from onnx import numpy_helper

        for t in tensors:
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
            if len(raw) <= INLINE_BYTES:
                continue
            offset, length = self.stream(f"built:{t.name}", iter([raw]), len(raw))
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            self.refer(t, offset, length)

    def close(self) -> None:
        self.file.close()


class LazyConstants(Mapping[str, np.ndarray]):
    """The model's constants for the placeholder expansion: inline ones from the proto, the
    weights left out of it read from the checkpoint on access (a few kept for the node's repeated reads)."""

    def __init__(self, proto: Any, ckpt: Checkpoint, pending: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]):
        from onnx import numpy_helper

        self.inline = {t.name: t for t in proto.graph.initializer}
        for node in proto.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.inline[node.output[0]] = a.t
        self._to_array = numpy_helper.to_array
        self.ckpt, self.pending = ckpt, pending
        self.cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self.inline or name in self.pending

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.inline:
            return self._to_array(self.inline[name])
        if name not in self.pending:
            raise KeyError(name)
        if name not in self.cache:
            dtype, _ = self.pending[name]
            self.cache[name] = self.ckpt.store.get(name, dtype).numpy()
            while len(self.cache) > 8:
                self.cache.popitem(last=False)
        return self.cache[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.inline
        yield from self.pending

    def __len__(self) -> int:
        return len(self.inline) + len(self.pending)


def _chunks(ckpt: Checkpoint, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Iterator[bytes]:
    """The weight's bytes as `dtype`, read and converted in row chunks."""
    def raw(t: torch.Tensor) -> bytes:   # as bytes (numpy has no bfloat16)
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    if not shape or shape[0] == 0:
        yield raw(ckpt.store.get(name, dtype))
        return
    row = max(1, int(np.prod(shape[1:])))
    step = max(1, CHUNK_ELEMENTS // row)
    for a in range(0, shape[0], step):
        yield raw(ckpt.store.rows(name, a, min(a + step, shape[0]), dtype))


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    table = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
             torch.float64: TensorProto.DOUBLE, torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8,
             torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL}
    if dtype not in table:
        raise ExportError(f"a weight of dtype {dtype} cannot be streamed to ONNX (float, int or bool tensors only)")
    return table[dtype]


def write_weights(proto: Any, ckpt: Checkpoint, pending: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                  data: DataFile) -> None:
    """Stream every left-out weight the graph still reads into `data`, adding its reference initializer."""
    from onnx import TensorProto

    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    first: dict[str, str] = {}          # stored tensor + dtype -> the initializer that holds it
    renamed: dict[str, str] = {}
    for name, (dtype, shape) in pending.items():
        if name not in used:
            continue
        if name not in ckpt.store:
            raise CheckpointError(f"the exported graph reads {name!r}, which is not in {ckpt.directory}: the "
                                  "folder does not match its config")
        source = ckpt.store.aliases.get(name, name)
        if f"{source}:{dtype}" in first:  # a tied weight: one initializer read under both names (loaded once)
            renamed[name] = first[f"{source}:{dtype}"]
            continue
        first[f"{source}:{dtype}"] = name
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        offset, length = data.stream(f"{source}:{dtype}", _chunks(ckpt, name, dtype, shape), nbytes)
        t = TensorProto(name=name, data_type=_onnx_dtype(dtype), dims=list(shape))
        data.refer(t, offset, length)
        proto.graph.initializer.append(t)
    if renamed:
        for node in proto.graph.node:
            for i, x in enumerate(node.input):
                if x in renamed:
                    node.input[i] = renamed[x]


# ----------------------------------------------------------------------------- 4. verification
def streamed_forward(ckpt: Checkpoint, inputs: Inputs) -> list[torch.Tensor]:
    """The torch model's float outputs on `inputs`, each module's own weights read just before it runs
    and released after (float32; embedding tables in the checkpoint's dtype, their output cast)."""
    import torch.utils._pytree as pytree

    model, handles = ckpt.model, []
    model_tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)} | set(ckpt.lazy_buffers)
    for path, mod in model.named_modules():
        own = [f"{path}.{leaf}" if path else leaf for leaf in list(mod._parameters) + list(mod._buffers)]
        if not any(n in model_tensors for n in own):
            continue

        def load(m: nn.Module, args: Any, path: str = path) -> None:
            _load_own(ckpt, path, m)

        def free(m: nn.Module, args: Any, out: Any, path: str = path) -> Any:
            _release_own(ckpt, path, m)
            return_freed_memory()   # freed weights below glibc's mmap threshold stay resident otherwise
            return pytree.tree_map(lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                                   out)

        handles += [mod.register_forward_pre_hook(load), mod.register_forward_hook(free)]
    try:
        with torch.no_grad():
            out = inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _load_own(ckpt: Checkpoint, path: str, mod: nn.Module) -> None:
    for leaf, t in list(mod._parameters.items()) + list(mod._buffers.items()):
        full = f"{path}.{leaf}" if path else leaf
        if t is None or full not in ckpt.store:
            continue
        keep = isinstance(mod, nn.Embedding) or not t.dtype.is_floating_point
        real = ckpt.store.get(full, None if keep else torch.float32)
        value = nn.Parameter(real, requires_grad=False) if leaf in mod._parameters else real
        for alias in ckpt.aliases.get(full, [full]):
            _set_tensor(ckpt.model, alias, value)


def _release_own(ckpt: Checkpoint, path: str, mod: nn.Module) -> None:
    for leaf, t in list(mod._parameters.items()) + list(mod._buffers.items()):
        full = f"{path}.{leaf}" if path else leaf
        if t is None or full not in ckpt.store or t.device.type == "meta":
            continue
        meta = torch.empty_like(t, device="meta")
        value = nn.Parameter(meta, requires_grad=False) if leaf in mod._parameters else meta
        for alias in ckpt.aliases.get(full, [full]):
            _set_tensor(ckpt.model, alias, value)


def verify_file(path: Path, reference: list[torch.Tensor], inputs: Inputs, *, rtol: float) -> tuple[float, float, float]:
    """Run the written file in onnxruntime and compare its float outputs with `reference`."""
    from .compare import compare

    from rewrite.backends.onnx import session

    sess = session(path, config=BOUNDED_SESSION_CONFIG, arena=False)
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name not in inputs.kwargs:
            raise ExportError(f"the ONNX file has input {inp.name!r}, the example has {sorted(inputs.kwargs)}")
        feeds[inp.name] = inputs.kwargs[inp.name].numpy()
    got = sess.run(None, feeds)
    del sess
    floats = [g for g in got if np.issubdtype(g.dtype, np.floating)]
    if len(floats) != len(reference):
        raise ExportError(f"onnxruntime returned {len(floats)} float outputs, the torch model {len(reference)}")
    agreement = compare(list(zip(reference, floats)), rtol=rtol).check(
        "onnxruntime", consequence="; the ONNX file was not written")
    return agreement.max_abs, agreement.max_rel, agreement.cosine


# ----------------------------------------------------------------------------- the export
def export_checkpoint(directory: str | Path, path: str | Path, *, opset: int = 21, verify: bool = True,
                      tokens: int = 8, rtol: float = 1e-3, options: Any = None,
                      progress: bool | None = None) -> StreamedExport:
    """Write `path` (+ `<name>.data`) from a checkpoint folder without holding its weights, verified in onnxruntime.

    `directory`: a folder written by `rewrite.sequential.quantize_sequential` (packed weights
    stay packed: MatMulNBits and friends) or a plain HF checkpoint folder. The files appear at
    `path` only after the check passed. `tokens`: the length of the check's token sequence.
    `options`: the spec's `export.onnx` settings (an `OnnxExportSpec`) for the lowering of quantized ops.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meter = MemoryMeter()
    notes: list[str] = []
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with showing(progress):
            with meter.phase("capture (fake weights)"):
                ckpt = open_folder(directory)
                example = example_for(ckpt, tokens)
                proto, pending = capture_graph(ckpt, example, opset)
            note(f"captured {len(proto.graph.node)} ONNX nodes; {len(pending)} weights to stream")
            tmp_model = tmpdir / path.name
            with meter.phase("write ONNX (streamed)"):
                from rewrite.kernels.quant.onnx_lowering import expand_placeholders

                data = DataFile(tmpdir / (path.name + ".data"))
                try:
                    expand_placeholders(proto, options, consts=LazyConstants(proto, open_folder(directory), pending),
                                        emit=data.emit)
                    kept = keep_tables_narrow(proto, ckpt, pending)
                    if kept:
                        notes.append(f"kept in the checkpoint's dtype (looked up / cast per chunk): {', '.join(kept)}")
                    write_weights(proto, ckpt, pending, data)
                finally:
                    data.close()
                import onnx

                onnx.save_model(proto, tmp_model)
                del proto
                return_freed_memory()
            size = sum(f.stat().st_size for f in tmpdir.iterdir())
            record = StreamedExport(path, path.parent / (path.name + ".data"), size, meter.phases, notes=notes,
                                    tokens=tokens)
            if verify:
                with meter.phase("torch reference (streamed)"):
                    reference = streamed_forward(open_folder(directory), example)
                    return_freed_memory()
                with meter.phase("onnxruntime verify"):
                    record.max_abs_error, record.rel_error, record.cosine = verify_file(
                        tmp_model, reference, example, rtol=rtol)
                record.verified = True
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
        return record
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
