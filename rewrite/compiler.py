"""`rewrite.compile` and the `Compiled` result it returns."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .calibration import CalibrationData
from .inputs import Inputs
from .measure import cost, fidelity
from .passmanager import PassContext, check_needs, pass_for, run_passes
from .progress import showing, stage
from .program import Program
from .report import ExportRecord, LatencyRecord, PassRecord, Report
from .spec import GENERATION_OPSET, Spec

log = logging.getLogger("rewrite")


@dataclass
class Compiled:
    """The result of `compile`: the rewritten module, its report, and its lowerings."""

    program: Program
    original: Program
    report: Report
    spec: Spec
    calibration: CalibrationData | None = None

    def verification_batches(self) -> list[Inputs]:
        """Held-back calibration batches (or the example inputs) for checking backends."""
        if self.calibration is None or not self.calibration.holdout:
            return [self.program.example]
        return list(self.calibration.holdout)

    @property
    def module(self) -> torch.fx.GraphModule:
        """A GraphModule called exactly like the original model, with the same output structure."""
        return self.program.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.program.module(*args, **kwargs)

    def export(self, path: str | os.PathLike, *, verify: bool = True, opset: int | None = None,
               dynamic: bool | None = None, verify_inputs: Iterable[Any] | None = None, tokenizer: Any = None,
               progress: bool | None = None) -> ExportRecord:
        """Write an ONNX model, verified in onnxruntime against `module` (atomic on failure).

        A text-generation graph is exported with its KV cache (`backends.onnx_generation`) and
        also verified by greedy generation; `tokenizer` is then saved beside the file.

        Example:
            >>> import tempfile, torch, rewrite
            >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
            >>> compiled = rewrite.compile(model, None, example_inputs=(torch.randn(2, 16),), progress=False)
            >>> with tempfile.TemporaryDirectory() as d:
            ...     record = compiled.export(f"{d}/model.onnx", progress=False)
            >>> record.verified
            True
        """
        with showing(progress):
            return self._export(path, verify=verify, opset=opset, dynamic=dynamic, verify_inputs=verify_inputs,
                                tokenizer=tokenizer)

    def _export(self, path: str | os.PathLike, *, verify: bool, opset: int | None, dynamic: bool | None,
                verify_inputs: Iterable[Any] | None, tokenizer: Any = None) -> ExportRecord:
        from rewrite.backends.onnx import export_onnx

        onnx_spec = self.spec.export.onnx
        if self.program.notes.get("generation"):
            return self._export_generation(Path(path), verify=verify, opset=opset, tokenizer=tokenizer)
        batches = [Inputs.of(b) for b in verify_inputs] if verify_inputs is not None else [self.program.example]
        rtol, quantile, why = self.backend_check()
        record = export_onnx(
            self.program, Path(path),
            opset=opset or onnx_spec.opset,
            dynamic=onnx_spec.dynamic if dynamic is None else dynamic,
            external_data=onnx_spec.external_data, debug_metadata=onnx_spec.debug_metadata,
            verify=verify, verify_inputs=batches, rtol=rtol, quantile=quantile, options=onnx_spec,
        )
        if why and verify:
            record.notes.append(why)
        self.report.exports.append(record)
        return record

    def _export_generation(self, path: Path, *, verify: bool, opset: int | None, tokenizer: Any) -> ExportRecord:
        from rewrite.backends.onnx_generation import export_generation

        onnx_spec = self.spec.export.onnx
        rtol, quantile, why = self.backend_check()
        prompts = self.verification_batches() if self.calibration is not None and not self.calibration.from_example else []
        if opset is None:  # generation graphs default to opset 23 (Attention with the KV cache) unless the spec sets one
            opset = onnx_spec.opset if "opset" in onnx_spec.model_fields_set else GENERATION_OPSET
        record = export_generation(self.program, path, opset=opset, external_data=onnx_spec.external_data,
                                   debug_metadata=onnx_spec.debug_metadata, verify=verify, prompts=prompts,
                                   rtol=rtol, quantile=quantile, tokenizer=tokenizer, options=onnx_spec)
        if why and verify:
            record.notes.append(why)
        self.report.exports.append(record)
        return record

    def measure_latency(self, inputs: Any = None, *, repeats: int = 20, progress: bool | None = None) -> LatencyRecord:
        """onnxruntime latency of the original and the rewritten model, side by side; kept in the report.

        At `inputs`, by default the largest calibration batch: example inputs are often tiny,
        and at tiny shapes fixed per-op overheads hide what a rewrite saves. The rewritten
        model's exported file is reused when `export` wrote one; the original is exported to a
        temporary folder.
        """
        from rewrite.backends.onnx import describe_shape, measure_latency

        if inputs is None:
            pool = (list(self.calibration.batches) + list(self.calibration.holdout)) if self.calibration else []
            inputs = max(pool, key=lambda b: sum(t.numel() for t in b.tensors())) if pool else self.program.example
        inputs = Inputs.of(inputs)
        written = next((Path(e.path) for e in reversed(self.report.exports) if e.backend == "onnx" and Path(e.path).exists()), None)
        with showing(progress), stage(f"measure onnxruntime latency at {describe_shape(self.program, inputs)}"):
            before, after = measure_latency([(self.original, None), (self.program, written)], inputs, repeats=repeats,
                                            opset=self.spec.export.onnx.opset)
        import rewrite.backends.onnx as onnx_backend

        provider = onnx_backend.providers()[0].replace("ExecutionProvider", "")
        record = LatencyRecord(runtime=f"onnxruntime {provider}", shape=describe_shape(self.program, inputs), before_ms=before,
                               after_ms=after, repeats=repeats)
        self.report.latency = record
        return record

    def backend_check(self) -> tuple[float, float, str]:
        """(relative tolerance, fraction of values within it, why) for backend verification.

        The spec's values where given; else 1e-4 for every value, or for graphs with int8
        activations the looser `kernels.quant.INT8_ACTIVATION_CHECK` (and a note saying so).
        """
        from rewrite.kernels.quant import INT8_ACTIVATION_CHECK, rounds_activations

        v = self.spec.verify
        rtol, quantile, why = 1e-4, 1.0, ""
        if rounds_activations(self.program.graph):
            rtol, quantile = INT8_ACTIVATION_CHECK
            why = (f"int8 activations: verified with {quantile:.0%} of output values within {rtol} of the output's "
                   "largest magnitude (onnxruntime and torch round a few activations differently after float "
                   "differences of ~1e-7 upstream); set verify.backend_rtol / backend_quantile to override")
        if v.backend_rtol is not None or v.backend_quantile is not None:
            why = ""
        return (v.backend_rtol if v.backend_rtol is not None else rtol,
                v.backend_quantile if v.backend_quantile is not None else quantile, why)

    def build(self, backend: str = "tvm", target: Any = "llvm", **options: Any) -> Any:
        """Build the rewritten graph with another backend (TVM Relax); returns a callable."""
        if backend != "tvm":
            raise ValueError(f"unknown backend {backend!r}: build supports 'tvm' (use export() for ONNX)")
        from rewrite.backends.tvm import build_tvm

        return build_tvm(self.program, target=target, **options)


def compile(
    model: torch.nn.Module | Program,
    spec: Spec | dict | str | os.PathLike | None = None,
    *,
    example_inputs: Any,
    calibration: Iterable[Any] | None = None,
    dynamic: bool = True,
    task_loss: Any = None,
    progress: bool | None = None,
    task: str | None = "auto",
) -> Compiled:
    """Capture `model`, apply the spec's passes, verify, and return a `Compiled`.

    `example_inputs` is a tuple of positional args, a dict of keyword args, or one tensor.
    `calibration` is any iterable of batches shaped like `example_inputs` (a DataLoader works);
    passes that need data refuse to run without it.
    `task`: "text-generation" captures a causal LM around its KV cache (`rewrite.generation`:
    one graph for prefill and decode, exported with the cache); "auto" (the default) picks it
    for HF causal LMs; None keeps the full-sequence graph.
    `model` may also be a `Program` from `Program.capture` (captured once, compiled with
    several specs); it is cloned, not changed.

    Example: 8-bit weights for a small MLP (RTN needs no calibration data):
        >>> import torch
        >>> import rewrite
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
        >>> x = torch.randn(4, 64)
        >>> compiled = rewrite.compile(model, {"passes": [{"kind": "quantize", "weights": {"bits": 8, "group_size": 32}}]},
        ...                            example_inputs=(x,), progress=False)
        >>> compiled.report.passes[0].kind
        'quantize'
        >>> bool((compiled(x) - model(x)).abs().max() < 0.05)
        True
    """
    with showing(progress):
        return _compile(model, spec, example_inputs, calibration, dynamic, task_loss, task)


def _compile(model: torch.nn.Module | Program, spec: Any, example_inputs: Any, calibration: Any, dynamic: bool, task_loss: Any,
             task: str | None) -> Compiled:
    spec = Spec.load(spec)
    example = Inputs.of(example_inputs)
    passes = [pass_for(s) for s in spec.passes]
    from .passmanager import check_order

    check_order(passes)  # before any work
    from . import generation

    layout = None
    if generation.resolve_task(model, task) == generation.TASK:
        generation.check_passes(passes)
        layout = generation.layout_for(model, example)
        example = generation.capture_example(model, layout, example)
        calibration = generation.prefill_batches(layout, calibration)
        dynamic = generation.GenerationShapes(layout.num_layers, layout.position_ids) if dynamic else False
        model = generation.CacheGraph(model)
    calib = CalibrationData.from_user(calibration, example, samples=spec.calibration.samples, holdout=spec.calibration.holdout,
                                      check_shapes=layout is None)
    check_needs(passes, calib)

    from rewrite.passes.canonicalize import canonicalize

    with stage(f"capture {type(model).__name__} with torch.export"):
        original = model.clone() if isinstance(model, Program) else Program.capture(model, example, dynamic=dynamic)
        if layout is not None:
            original.notes[generation.NOTES_KEY] = layout.to_dict()
        canonicalize(original)
    program = original.clone()
    before = cost(original)
    ctx = PassContext(spec=spec, calibration=calib, original=original, task_loss=task_loss, progress=None)
    records: list[PassRecord] = []
    warnings: list[str] = []
    program = run_passes(program, ctx, passes, records, warnings)
    if spec.budget is not None:
        rebuild = None
        if spec.executor != "local" and not isinstance(model, Program) and layout is None:
            rebuild = Rebuild(model=model, spec=spec.model_dump(mode="json", exclude={"budget", "executor"}),
                              example_inputs=example, calibration=None if calib.from_example else calib.batches + calib.holdout,
                              dynamic=dynamic, task=None)
        with stage("budget: choosing the rewrites"):
            program = _apply_budget(program, ctx, records, rebuild)
    n_cal = sum(b.batch_size() for b in calib.batches)
    n_hold = sum(b.batch_size() for b in calib.holdout)
    report = Report(
        model=program.name, before=before, after=cost(program), passes=records,
        fidelity=fidelity(original, program, calib.holdout),
        calibration=("none given: example inputs used for verification" if calib.from_example
                     else f"{n_cal} samples in {len(calib.batches)} batches; {n_hold} held back for verification"),
        warnings=warnings,
    )
    return Compiled(program=program, original=original, report=report, spec=spec, calibration=calib)


@dataclass
class Rebuild:
    """How a worker that cannot receive a captured graph rebuilds the allocator's base program:
    compile `model` with the spec minus its budget, exactly as the driver did."""

    model: Any
    spec: dict[str, Any]
    example_inputs: Any
    calibration: Any
    dynamic: bool = True
    task: str | None = "auto"


def rebuild_bench(rebuild: Rebuild, with_latency: bool) -> Any:
    """A worker's `setup` for the allocator's cost table: recompile the base program from
    picklable parts (see `Rebuild`) and return it as a `rewrite.allocate.KnobBench`."""
    from .allocate import bench_for, default_latency_fn

    compiled = compile(rebuild.model, rebuild.spec, example_inputs=rebuild.example_inputs,
                       calibration=rebuild.calibration, dynamic=rebuild.dynamic, task=rebuild.task, progress=False)
    ctx = PassContext(spec=compiled.spec, calibration=compiled.calibration, original=compiled.original)
    return bench_for(compiled.program, ctx, default_latency_fn(ctx) if with_latency else None)


def _apply_budget(program: Program, ctx: PassContext, records: list[PassRecord], rebuild: Rebuild | None = None) -> Program:
    """Let the allocator choose the rewrites that meet `spec.budget`; record its decision."""
    import time

    from .allocate import allocate

    start = time.perf_counter()
    setup = (rebuild_bench, (rebuild, ctx.spec.budget.latency is not None)) if rebuild is not None else None
    alloc = allocate(program, ctx, ctx.spec.budget, executor=ctx.spec.executor, worker_setup=setup)
    chosen = next(r for r in alloc.tried if r.verdict == "chosen")
    records.append(PassRecord(
        name=f"{len(records)}:budget", kind="budget", seconds=time.perf_counter() - start,
        cost=cost(alloc.program), fidelity=fidelity(ctx.original, alloc.program, ctx.calibration.holdout),
        summary=f"chose {' + '.join(chosen.knobs)} for budget {ctx.spec.budget.model_dump(exclude_none=True)}",
        details={"cost table (each setting alone)": [k.model_dump(exclude={"passes"}) for k in alloc.table],
                 "plans (chosen and rejected)": [r.model_dump() for r in alloc.tried],
                 "passes": alloc.passes},
        notes=[f"predicted latency ratio {chosen.predicted_latency:.3f}, measured {chosen.measured_latency}"
               if chosen.measured_latency is not None else f"predicted FLOPs ratio {chosen.predicted_flops:.3f}"],
    ))
    return alloc.program
