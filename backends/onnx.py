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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from rewrite.capture import export_program
from rewrite.errors import ExportError, VerificationError
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.report import ExportRecord

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of weights above which they go in a side file


def to_onnx_proto(program: Program, *, opset: int = 21, dynamic: bool = True) -> Any:
    """Export the program to an onnx.ModelProto (custom ops lowered, post-processed)."""
    import onnx

    from kernels import registry

    registry.load_all()
    ep = export_program(program.module, program.example, dynamic)  # the unlifted module needs a re-export
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                ep, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                custom_translation_table=dict(registry.ONNX_TRANSLATIONS) or None,
            )
    except Exception as exc:  # noqa: BLE001
        op = _unsupported_op(exc)
        hint = f" (operator {op} has no ONNX lowering: register one in kernels.registry.ONNX_TRANSLATIONS)" if op else ""
        raise ExportError(f"ONNX export failed{hint}: {str(exc).strip().splitlines()[0][:300]}") from exc
    proto = onnx_program.model_proto
    for post in registry.ONNX_POSTPROCESS:
        post(proto)
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
                quantile: float = 1.0) -> ExportRecord:
    import onnx

    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = to_onnx_proto(program, opset=opset, dynamic=dynamic)
    if not debug_metadata:
        strip_debug_metadata(proto)
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
        record = ExportRecord(backend="onnx", path=str(path), bytes=_size_on_disk(tmpdir), seconds=0.0, verified=False)
        if verify:
            err = verify_onnx(program, tmp_model, verify_inputs or [program.example], rtol=rtol, quantile=quantile)
            record.verified = True
            record.max_abs_error, record.rel_error, record.cosine, record.provider = err
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    record.seconds = time.perf_counter() - start
    return record


def _size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


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


def session(path: str | Path, *, threads: int | None = None, provider: list[str] | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
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
    the largest), relative to the largest output magnitude; the record keeps the largest.
    """
    sess = session(model_path)
    errors: list[np.ndarray] = []
    worst_abs = 0.0
    scale = 1e-6
    cos_min = 1.0
    for batch in batches:
        with torch.no_grad():
            ref = [t for t in pytree.tree_leaves(program.run(batch)) if isinstance(t, torch.Tensor)]
        got = sess.run(None, feeds_for(sess, program, batch))
        if len(got) != len(ref):
            raise VerificationError(f"onnxruntime returned {len(got)} outputs, the torch module {len(ref)}")
        for i, (r, g) in enumerate(zip(ref, got)):
            r = r.detach().cpu().numpy()
            if r.shape != g.shape:
                raise VerificationError(f"output {i}: onnxruntime shape {g.shape} != torch shape {r.shape}")
            if not np.issubdtype(r.dtype, np.floating):
                if not np.array_equal(r, g):
                    raise VerificationError(f"output {i}: integer outputs differ between onnxruntime and torch")
                continue
            if not r.size:
                continue
            a, b = r.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)
            errors.append(np.abs(a - b))
            worst_abs = max(worst_abs, float(errors[-1].max()))
            scale = max(scale, float(np.abs(a).max()))
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            if np.linalg.norm(a - b) > 1e-7 * max(na, nb, 1e-30):
                cos_min = min(cos_min, float(a @ b / max(na * nb, 1e-30)))
    # relative error: worst absolute error over the largest output magnitude (outputs that
    # are ~0 by construction, like the mean of a LayerNorm, would make a per-output ratio noise)
    worst_rel = worst_abs / scale
    checked = worst_rel
    if quantile < 1.0 and errors:
        checked = float(np.quantile(np.concatenate(errors), quantile)) / scale
    if checked > rtol:
        what = "max relative error" if quantile >= 1.0 else f"relative error at the {quantile:.0%} quantile"
        raise VerificationError(
            f"onnxruntime does not match the rewritten torch module: {what} {checked:.2e} "
            f"> tolerance {rtol:.0e} (max abs error {worst_abs:.2e}); the ONNX file was not written"
        )
    return worst_abs, worst_rel, cos_min, sess.get_providers()[0]


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings on stdout/stderr."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _unsupported_op(exc: BaseException) -> str | None:
    import re

    text = str(exc)
    m = re.search(r"(rewrite::\w+|aten::\w+|[\w]+::[\w.]+)", text)
    return m.group(1) if m else None
