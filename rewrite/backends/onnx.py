"""ONNX backend: torch.onnx (dynamo) export, custom-op lowerings, onnxruntime verification.

The file appears at `path` only after it exported and (when asked) matched the torch
module in onnxruntime; on any failure nothing is left on disk.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from rewrite.capture import export_program
from rewrite.compare import compare
from rewrite.errors import ExportError, VerificationError
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.progress import bar, stage
from rewrite.report import ExportRecord
from rewrite.spec import OnnxExportSpec

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go in a side file


def to_onnx_proto(program: Program, *, opset: int = 21, dynamic: bool = True, options: OnnxExportSpec | None = None) -> Any:
    """Export the program to an onnx.ModelProto (custom ops lowered, post-processed with the
    lowering `options`: the spec's `export.onnx`)."""
    import onnx

    from rewrite.kernels import registry

    registry.load_all()
    ep = export_program(program.module, program.example, dynamic)  # the unlifted module needs a re-export
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                ep, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                custom_translation_table=registry.onnx_translations() or None,
            )
    except Exception as exc:  # noqa: BLE001
        raise ExportError(explain_export_failure(exc, ep)) from exc
    proto = onnx_program.model_proto
    for post in registry.onnx_postprocess():
        post(proto, options or OnnxExportSpec())
    inputs, outputs, dims = interface_names(program)
    if len(proto.graph.input) != len(inputs):
        inputs = None  # keep the exporter's names when they do not line up with the placeholders
    if len(proto.graph.output) != len(outputs):
        outputs = None
    name_interface(proto, inputs, outputs, dims)
    return proto


def strip_debug_metadata(proto: Any) -> None:
    """Drop per-node doc strings and metadata (torch's stack traces and scopes) in place.

    They do not change what runs, but cost about 2.5 KB per node: 0.4 MB on a 6-layer
    MiniLM, a few percent of a 4-bit model's file.
    """
    def strip(graph: Any) -> None:
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g)
                for g in attr.graphs:
                    strip(g)
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            vi.doc_string = ""
            del vi.metadata_props[:]

    strip(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            node.doc_string = ""
            del node.metadata_props[:]


def export_onnx(program: Program, path: Path, *, opset: int = 21, dynamic: bool = True, external_data: Any = "auto",
                debug_metadata: bool = False, verify: bool = True, verify_inputs: Sequence[Inputs] = (), rtol: float = 1e-4,
                quantile: float = 1.0, options: OnnxExportSpec | None = None) -> ExportRecord:
    """Write `path` (atomic: nothing is left on a failed export or check), verified in onnxruntime."""
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage(f"export ONNX (opset {opset})"):
        proto = to_onnx_proto(program, opset=opset, dynamic=dynamic, options=options)
    if not debug_metadata:
        strip_debug_metadata(proto)
    with staged_onnx_file(proto, path, program, external_data) as tmp_model:
        record = ExportRecord(backend="onnx", path=str(path), bytes=_size_on_disk(tmp_model.parent), seconds=0.0, verified=False)
        if verify:
            batches = list(verify_inputs or [program.example])
            with stage(f"verify in onnxruntime on {sum(b.batch_size() for b in batches)} sample(s)"):
                err = verify_onnx(program, tmp_model, batches, rtol=rtol, quantile=quantile)
            record.verified = True
            record.max_abs_error, record.rel_error, record.cosine, record.provider = err
            record.tolerance, record.quantile, record.batches = rtol, quantile, sum(b.batch_size() for b in batches)
    record.seconds = time.perf_counter() - start
    return record


@contextlib.contextmanager
def staged_onnx_file(proto: Any, path: Path, program: Program, external_data: Any = "auto") -> Iterator[Path]:
    """Save `proto` in a temporary folder beside `path` and yield the temporary model's path;
    the files move into place only when the block succeeds (a failed check leaves nothing).

    Weights go to one side file `<name>.data` when `external_data` is true, or, with "auto",
    when the program's weights exceed `EXTERNAL_DATA_THRESHOLD` (protobuf's 2 GB limit).
    """
    import onnx

    weight_bytes = sum(t.numel() * t.element_size() for t in program.params().values())
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data == "auto" else bool(external_data)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        if use_external:
            onnx.save_model(proto, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(proto, tmp_model)
        yield tmp_model
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


# ------------------------------------------------------------------------ latency
def measure_latency(models: Sequence[tuple[Program, Path | None]], inputs: Inputs, *, repeats: int = 20,
                    warmup: int = 3, opset: int = 21) -> list[float]:
    """Median onnxruntime latency (ms) of each (program, exported file or None) on `inputs`.

    Programs without a file are exported (unverified) to a temporary folder first. The runs
    are interleaved (one run of each model per round) so that load from other processes hits
    every model alike: the ratios are what to read, the absolute numbers vary with the machine.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, (program, path) in enumerate(models):
            if path is None or not Path(path).exists():
                path = Path(tmp) / f"m{i}.onnx"
                export_onnx(program, path, opset=opset, verify=False)
            sess = session(path)
            sessions.append((sess, feeds_for(sess, program, inputs)))
        for sess, feeds in sessions:
            for _ in range(warmup):
                sess.run(None, feeds)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in bar(range(repeats), desc="onnxruntime latency", unit="round"):
            for k, (sess, feeds) in enumerate(sessions):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[k].append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def describe_shape(program: Program, inputs: Inputs) -> str:
    """`input_ids 16x128, attention_mask 16x128`: the shape latency was measured at (ONNX input names)."""
    pairs = zip([n.name for n in program.placeholders()], program.flat_inputs(inputs))
    return ", ".join(f"{name} {'x'.join(str(s) for s in t.shape)}" for name, t in pairs if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------ onnxruntime
def providers() -> list[str]:
    """CUDA when onnxruntime has it and a GPU driver is loadable, else CPU (quietly)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and _gpu_driver_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def session(path: str | Path, *, threads: int | None = None, provider: list[str] | None = None,
            config: dict[str, str] | None = None, arena: bool = True) -> Any:
    """An onnxruntime session on `path`; `config`: session config entries (`add_session_config_entry`);
    `arena=False` turns the CPU memory arena off (freed buffers go back instead of being kept for reuse)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=opts, providers=provider or providers())


def feeds_for(sess: Any, program: Program, inputs: Inputs) -> dict[str, np.ndarray]:
    """Map the program's flattened inputs onto the session's inputs (by name, else by order)."""
    flat = [x for x in program.flat_inputs(inputs)]
    names = [n.name for n in program.placeholders()]
    by_name = dict(zip(names, flat))
    feeds = {}
    for i, inp in enumerate(sess.get_inputs()):
        value = by_name.get(inp.name, flat[i] if i < len(flat) else None)
        if value is None:
            raise VerificationError(f"onnx input {inp.name!r} has no matching model input (inputs: {names})")
        feeds[inp.name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return feeds


class OnnxModule:
    """An onnxruntime session called like the rewritten module (same output structure)."""

    def __init__(self, path: str | Path, program: Program, **session_options: Any):
        self.session = session(path, **session_options)
        self.program = program

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = Inputs(tuple(args), dict(kwargs))
        outs = self.session.run(None, feeds_for(self.session, self.program, inputs))
        spec = getattr(self.program.graph._codegen, "pytree_info", None)
        tensors = [torch.from_numpy(o) for o in outs]
        if spec is not None and spec.out_spec is not None and spec.out_spec.num_leaves == len(tensors):
            return pytree.tree_unflatten(tensors, spec.out_spec)
        return tensors


def verify_onnx(program: Program, model_path: Path, batches: Sequence[Inputs], *, rtol: float = 1e-4,
                quantile: float = 1.0) -> tuple[float, float, float, str]:
    """Run onnxruntime and the torch module on each batch; raise if they disagree.

    The error checked is the `quantile` of the absolute errors over all float outputs (1.0:
    the largest), relative to the largest output magnitude (`rewrite.compare`); the record
    keeps the largest.
    """
    sess = session(model_path)

    def pairs() -> Iterator[tuple[Any, Any]]:
        """Batch by batch, so `compare` never holds every batch's outputs at once."""
        for batch in batches:
            with torch.no_grad():
                ref = [t for t in pytree.tree_leaves(program.run(batch)) if isinstance(t, torch.Tensor)]
            got = sess.run(None, feeds_for(sess, program, batch))
            if len(got) != len(ref):
                raise VerificationError(f"onnxruntime returned {len(got)} outputs, the torch module {len(ref)}")
            yield from zip(ref, got)
            del ref, got

    agreement = compare(pairs(), rtol=rtol, quantile=quantile).check("onnxruntime", consequence="; the ONNX file was not written")
    worst_abs, worst_rel, cos_min = agreement.max_abs, agreement.max_rel, agreement.cosine
    return worst_abs, worst_rel, cos_min, sess.get_providers()[0]


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings on stdout/stderr."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def explain_export_failure(exc: BaseException, ep: Any) -> str:
    """The exporter's cause (every exception in the chain, not only the wrapper's first line),
    the graph node it failed on with the model source line that made it, and a fix."""
    from rewrite.capture import exception_summary, source_line

    causes = exception_summary(exc)
    text = "\n".join(causes) + "\n" + "\n".join(str(e) for e in _notes(exc))
    node = _failing_node(text, ep)
    where = ""
    if node is not None:
        line = source_line(node)
        where = f" at node %{node.name} ({node.target}" + (f", from {line})" if line else ")")
        causes = [c for c in causes if "Error when translating node" not in c] or causes
    if "No ONNX function found" in text or "has no ONNX lowering" in text:
        fix = ("the operator has no ONNX lowering: register one next to the op with kernels.registry.lowering(op, 'onnx'), or replace "
               "it in the model with torch operators")
    elif "view" in text.lower() and "stride" in text.lower():
        fix = "a view of a non-contiguous tensor: use reshape (or .contiguous()) before the view in the model"
    else:
        fix = "run with debug_metadata: true to keep torch's stack traces in the graph, and report the node above"
    cause = "; ".join(causes) or type(exc).__name__
    return f"ONNX export failed{where}: {cause}; fix: {fix}"


def _notes(exc: BaseException) -> list[str]:
    out, cur, seen = [], exc, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out += list(getattr(cur, "__notes__", []) or [])
        cur = cur.__cause__ or cur.__context__
    return out


def _failing_node(text: str, ep: Any) -> Any:
    """The exported program's node named in the exporter's message ("node %twice", "While executing %view_3")."""
    names = re.findall(r"(?:node|executing) %(\w+)", text)
    if not names or ep is None:
        return None
    by_name = {n.name: n for n in ep.graph.nodes}
    return next((by_name[n] for n in names if n in by_name), None)


# ------------------------------------------------------------------------ interface names
def interface_names(program: Program) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """(input names, output names, {input: {axis: dim name}}) of the program's exported interface.

    Inputs keep the model's argument names (the placeholders'). Outputs are named by their
    path in the output structure: `last_hidden_state` / `logits` for ModelOutput fields and
    dict keys, `output_0`, `output_1` for a tuple's positions, `hidden.0` for nested ones,
    `output` for a lone tensor. Dims follow `rewrite.capture.dim_names`.
    """
    from rewrite.capture import dim_names

    inputs = [n.name for n in program.placeholders()]
    dims: dict[str, dict[int, str]] = {}
    for node in program.placeholders():
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims[node.name] = dim_names(val.is_floating_point(), val.dim())
    return inputs, output_names(program), dims


def output_names(program: Program) -> list[str]:
    """One name per flattened output leaf, from the keys and fields of the output structure."""
    info = getattr(program.graph._codegen, "pytree_info", None)
    n_out = len(pytree.tree_leaves(program.output_node().args[0]))
    if info is None or info.out_spec is None or info.out_spec.num_leaves != n_out:
        return [f"output_{i}" for i in range(n_out)]
    return names_of_outputs(info.out_spec)


def names_of_outputs(out_spec: Any) -> list[str]:
    """One name per leaf of an output tree spec: `logits`, `present.0.key`; positional leaves
    `output_0...`; a single tensor `output`."""
    if out_spec.is_leaf():
        return ["output"]
    tree = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [_key_name(k) for k in path]
        if isinstance(path[0], pytree.SequenceKey):
            parts[0] = f"output_{parts[0]}"
        names.append(".".join(parts))
    return names


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key).strip(".[]'\"")


def name_interface(proto: Any, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                   dim_names: Mapping[str, Mapping[int, str]] | None = None) -> None:
    """Rename an ONNX model's inputs, outputs and symbolic dims in place.

    `input_names`/`output_names`: new names for the graph inputs/outputs in order (None keeps
    them). `dim_names`: {input or output name (the new one): {axis: name}}. An input axis's
    symbol is renamed everywhere it occurs, inside expressions too (`s53 + 1` becomes
    `sequence_length + 1`), so outputs inherit the names; symbols that several inputs map to
    one name are merged (input_ids and attention_mask share `batch_size` even when torch.export
    gave their batch dims different symbols). An output axis given here is set directly.
    Used by the ONNX export and by other exporters that build their own interface (KV caches).
    """
    graph = proto.graph
    if input_names is not None:
        _check_count("input", graph.input, input_names)
        olds = [vi.name for vi in graph.input]
        for old, new in zip(olds, input_names):  # free the new names first (the exporter may use them inside)
            if new not in olds and new in _all_names(graph):
                _rename_value(graph, new, _fresh(new + "_internal", _all_names(graph)))
        temps = [_fresh(f"{old}__renaming", _all_names(graph)) for old in olds]
        for old, tmp in zip(olds, temps):  # via temporaries, so a permutation of names works too
            _rename_value(graph, old, tmp)
        for tmp, new in zip(temps, input_names):
            _rename_value(graph, tmp, new)
    if output_names is not None:
        _check_count("output", graph.output, output_names)
        _name_outputs(graph, list(output_names))
    if not dim_names:
        return
    symbols: dict[str, str] = {}
    for vi in graph.input:
        for axis, name in (dim_names.get(vi.name) or {}).items():
            dims = vi.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].dim_param and dims[axis].dim_param not in symbols:
                # two different sizes never share a name (an encoder-decoder's source and target
                # lengths: onnxruntime treats equal dim names as equal sizes); every input of one
                # call has the same batch, so batch symbols the exporter left apart still merge
                taken = name != "batch_size" and name in symbols.values()
                symbols[dims[axis].dim_param] = f"{vi.name}_{name}" if taken else name
    if symbols:
        pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True)) + r")(?![\w.])")
        for vi in _all_value_infos(graph):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pattern.sub(lambda m: symbols[m.group(1)], d.dim_param)
    for vi in graph.output:
        for axis, name in (dim_names.get(vi.name) or {}).items():
            dims = vi.type.tensor_type.shape.dim
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = name


def _check_count(what: str, values: Any, names: Sequence[str]) -> None:
    if len(values) != len(names):
        raise ExportError(f"cannot name the ONNX {what}s: the graph has {len(values)}, {len(names)} names were given ({list(names)})")
    if len(set(names)) != len(names):
        raise ExportError(f"ONNX {what} names must be unique, got {list(names)}")


def _all_value_infos(graph: Any) -> list[Any]:
    return list(graph.input) + list(graph.output) + list(graph.value_info)


def _all_names(graph: Any) -> set[str]:
    names = {vi.name for vi in _all_value_infos(graph)} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _name_outputs(graph: Any, new_names: list[str]) -> None:
    """Rename graph outputs; an output that is also an input, an initializer or another output
    gets an Identity node instead, so each output has its own name."""
    import onnx

    fixed = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    # an output cannot take an input's name: it gets a fresh one
    taken = _all_names(graph)
    new_names = [_fresh(n, taken | set(new_names[:i])) if n in {vi.name for vi in graph.input} else n
                 for i, n in enumerate(new_names)]
    # then move internal values out of the way of the names we are about to use
    current = [vi.name for vi in graph.output]
    for new in new_names:
        if new in taken and new not in current:
            _rename_value(graph, new, _fresh(new + "_internal", taken))
            taken = _all_names(graph)
    seen: set[str] = set()
    for i, vi in enumerate(list(graph.output)):
        old, new = vi.name, new_names[i]
        if old == new:
            seen.add(old)
            continue
        if old in fixed or old in seen or new in {o.name for o in graph.output}:
            if new in {o.name for o in graph.output}:  # another output already uses the new name
                _rename_value(graph, new, _fresh(new + "_internal", _all_names(graph)))
            graph.node.append(onnx.helper.make_node("Identity", [old], [new], name=f"output_identity_{i}"))
            graph.output[i].name = new
        else:
            _rename_value(graph, old, new)
        seen.add(new)


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename a value everywhere in a graph and its subgraphs (which may read outer names)."""
    for vi in _all_value_infos(graph):
        if vi.name == old:
            vi.name = new
    for t in graph.initializer:
        if t.name == old:
            t.name = new
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for i, x in enumerate(node.output):
            if x == old:
                node.output[i] = new
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_value(attr.g, old, new)
            for g in attr.graphs:
                _rename_value(g, old, new)
