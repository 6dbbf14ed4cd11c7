"""The budget allocator: choose skipping, pruning, token and bit-width settings jointly.

Given a `budget` (latency as a ratio of the original on the target runtime, size in MB,
or FLOPs as a ratio), the allocator

1. measures a cost table: each candidate setting of each knob (blocks skipped, FFN
   neurons pruned, heads pruned, tokens kept, weight bits) is applied alone to the
   original program; its onnxruntime latency ratio, weight bytes, FLOPs ratio and
   fidelity (1 - cosine on calibration batches) are recorded;
2. predicts every combination: latency and FLOPs ratios multiply, bytes follow the
   measured per-knob savings, fidelity drops add;
3. picks the combination with the least predicted fidelity drop inside the budget,
   builds it, measures it for real, and falls back to the next one when the real cost
   misses the budget by more than the tolerance.

The report lists the cost table, the chosen plan (predicted and measured) and the
alternatives rejected on the way.
"""
from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from rewrite.passes.prune import PruneSpec
from rewrite.passes.quantize import QuantizeSpec, QuantWeightsSpec
from rewrite.passes.skip import SkipSpec
from rewrite.passes.token import TokenSpec

from .errors import PassError
from .inputs import Inputs
from .measure import cost, fidelity
from .passmanager import PassContext, pass_for, run_passes
from .program import Program
from .report import PassRecord
from .spec import BudgetSpec

log = logging.getLogger("rewrite")

LatencyFn = Callable[[Program], float]


class Knob(BaseModel):
    """One setting of one technique, and what it costs when applied alone."""

    name: str
    technique: str
    passes: list[dict[str, Any]]
    latency_ratio: float = 1.0
    flops_ratio: float = 1.0
    bytes_saved: int = 0
    cosine_drop: float = 0.0


class PlanRow(BaseModel):
    knobs: list[str]
    predicted_latency: float
    predicted_flops: float
    predicted_mb: float
    predicted_drop: float
    measured_latency: float | None = None
    measured_flops: float | None = None
    measured_mb: float | None = None
    measured_drop: float | None = None
    verdict: str = ""


@dataclass
class Allocation:
    program: Program
    passes: list[dict[str, Any]]
    table: list[Knob]
    tried: list[PlanRow] = field(default_factory=list)


def candidate_knobs(program: Program, budget: BudgetSpec) -> list[Knob]:
    """The settings considered per technique (the empty setting is implicit)."""
    n_blocks = len(program.blocks())
    knobs: list[Knob] = []
    if n_blocks >= 3:
        for n in range(1, min(3, n_blocks - 1) + 1):
            knobs.append(Knob(name=f"skip {n}", technique="skip",
                              passes=[SkipSpec(layers=n, search="beam", importance="fidelity_drop").model_dump()]))
    for amount in (0.25, 0.5):
        knobs.append(Knob(name=f"neurons -{amount:.0%}", technique="neuron",
                          passes=[PruneSpec(granularity="neuron", amount=amount, compensate="lstsq").model_dump()]))
        knobs.append(Knob(name=f"heads -{amount:.0%}", technique="head",
                          passes=[PruneSpec(granularity="head", amount=amount, compensate="lstsq").model_dump()]))
    if _has_sequence_input(program) and n_blocks >= 3:
        for keep in (0.7, 0.5):
            for importance in ("norm", "cls_attention", "mean_distance"):  # which suits the model is measured, not guessed
                knobs.append(Knob(name=f"tokens keep {keep} ({importance})", technique="token",
                                  passes=[TokenSpec(keep=keep, after=[min(2, n_blocks - 2)], importance=importance).model_dump()]))
    knobs += quantize_knobs(budget)
    return knobs


def quantize_knobs(budget: BudgetSpec) -> list[Knob]:
    """int8 compute (W8A8, and 4-bit storage with int8 compute) for latency; weight-only 4-bit for size.

    Weight-only low-bit linears run as float matmuls in onnxruntime (no faster), so for a
    latency budget only the int8-compute settings are candidates; a size-only budget also
    gets weight-only W4, which keeps float activations.
    """
    if budget.size_mb is None and budget.latency is None:
        return []  # FLOPs count the logical work: quantization does not change them
    dynamic = {"mode": "dynamic"}
    w4 = QuantWeightsSpec(bits=4, group_size=64, symmetric=True)
    knobs = [Knob(name="W8A8 + emb8", technique="quantize",
                  passes=[QuantizeSpec(weights=None, activations=dynamic, embeddings=8).model_dump()]),
             Knob(name="W4A8 (GPTQ) + emb4", technique="quantize",
                  passes=[QuantizeSpec(method="gptq", weights=w4, activations=dynamic, embeddings=4,
                                       embeddings_group_size=128).model_dump()])]
    if budget.size_mb is not None:
        knobs.append(Knob(name="W4 (GPTQ) + emb4", technique="quantize",
                          passes=[QuantizeSpec(method="gptq", weights=w4, embeddings=4, embeddings_group_size=128).model_dump()]))
    return knobs


def _has_sequence_input(program: Program) -> bool:
    return any(not t.is_floating_point() and t.dim() >= 2 for t in program.example.tensors())


def apply_passes(original: Program, ctx: PassContext, passes: list[dict[str, Any]]) -> tuple[Program, list[PassRecord]]:
    from .spec import Spec

    import dataclasses

    specs = Spec.parse({"passes": passes}).passes
    records: list[PassRecord] = []
    trial_ctx = dataclasses.replace(ctx, state=set(ctx.state), cache={})
    program = run_passes(original.clone(), trial_ctx, [pass_for(s) for s in specs], records, [])
    return program, records


def onnx_latency(program: Program, inputs: Inputs | None = None, *, repeats: int = 10) -> float:
    """Median onnxruntime latency (seconds) of the program on `inputs` (default: its example inputs)."""
    from rewrite.backends.onnx import export_onnx, feeds_for, session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(program, path, verify=False)
        sess = session(path)
        feeds = feeds_for(sess, program, inputs if inputs is not None else program.example)
        sess.run(None, feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@dataclass
class KnobBench:
    """What every cost-table measurement needs: the base program, its context and costs."""

    program: Program
    ctx: PassContext
    base_flops: int
    base_bytes: int
    latency_fn: LatencyFn | None
    base_latency: float


def bench_for(program: Program, ctx: PassContext, latency_fn: LatencyFn | None) -> KnobBench:
    base = cost(program)
    return KnobBench(program, ctx, base.flops, base.weight_bytes, latency_fn,
                     latency_fn(program) if latency_fn is not None else 1.0)


def default_latency_fn(ctx: PassContext) -> LatencyFn:
    """onnxruntime on the largest calibration batch: the example inputs are often tiny, and at
    tiny shapes fixed per-op overheads hide what a rewrite saves."""
    largest = max(ctx.calibration.batches, key=lambda b: sum(t.numel() for t in b.tensors()))
    return lambda p: onnx_latency(p, largest)


def measure_knob(bench: KnobBench, passes: list[dict[str, Any]]) -> dict[str, float] | str:
    """One row of the cost table: a setting applied alone. A string says why it does not apply."""
    try:
        prog, _ = apply_passes(bench.program, bench.ctx, passes)
    except PassError as exc:  # the setting does not apply to this model (e.g. heads on a CNN)
        return str(exc)
    c = cost(prog)
    fid = fidelity(bench.program, prog, bench.ctx.calibration.batches[:2])
    row = {"cosine_drop": fid.cosine_drop if fid else 1.0,
           "flops_ratio": c.flops / bench.base_flops if bench.base_flops else 1.0,
           "bytes_saved": bench.base_bytes - c.weight_bytes}
    if bench.latency_fn is not None:
        row["latency_ratio"] = bench.latency_fn(prog) / bench.base_latency
    return row


def allocate(original: Program, ctx: PassContext, budget: BudgetSpec, *, latency_fn: LatencyFn | None = None,
             tolerance: float = 0.10, max_builds: int = 4, executor: str | None = None,
             worker_setup: tuple[Callable[..., "KnobBench"], tuple[Any, ...]] | None = None) -> Allocation:
    """Choose and build the plan that meets `budget` (see the module docstring).

    Latency defaults to onnxruntime on the largest calibration batch. `executor: "ray"`
    measures the cost table on Ray workers: each runs `worker_setup` (a function and its
    picklable arguments that rebuild the base program as a `KnobBench`, see
    `rewrite.compiler.rebuild_bench`) once and takes its latency ratios against its own base
    measurement. The plans are built here.
    """
    from .executor import executor_for

    ctx.calibration.require("the budget allocator")
    if budget.latency is None:
        latency_fn = None
    elif latency_fn is None:
        latency_fn = default_latency_fn(ctx)
    base = cost(original)
    knobs = candidate_knobs(original, budget)
    if not knobs:
        raise PassError("the budget allocator found nothing to apply to this model (no repeated blocks, no prunable groups)")
    runner = executor_for(executor)
    if runner.name == "local":
        local = bench_for(original, ctx, latency_fn)
        base_latency = local.base_latency
        rows = runner.map(lambda: local, (), measure_knob, [k.passes for k in knobs], description="budget: cost table")
    else:
        if worker_setup is None:
            raise PassError("executor 'ray' needs the model itself (an nn.Module, not a Program) to rebuild the base "
                            "program on each worker; pass the module to compile, or use executor: local")
        rows = runner.map(worker_setup[0], worker_setup[1], measure_knob, [k.passes for k in knobs],
                          description="budget: cost table")
        base_latency = latency_fn(original) if latency_fn is not None else 1.0
    usable = []
    for knob, row in zip(knobs, rows):
        if isinstance(row, str):
            log.info("budget: %s does not apply: %s", knob.name, row)
            continue
        usable.append(knob)
        knob.cosine_drop, knob.flops_ratio, knob.bytes_saved = row["cosine_drop"], row["flops_ratio"], int(row["bytes_saved"])
        knob.latency_ratio = row.get("latency_ratio", 1.0)
    knobs = usable
    if not knobs:
        raise PassError("the budget allocator found nothing to apply to this model (no repeated blocks, no prunable groups)")
    plans = _rank_plans(knobs, base.weight_bytes, budget)
    if not plans:
        raise PassError(f"no combination of the candidate settings meets the budget {budget.model_dump(exclude_none=True)}; "
                        "loosen it or add techniques")
    tried: list[PlanRow] = []
    for row, chosen in plans[:max_builds]:
        passes = [p for k in chosen for p in k.passes]
        prog, _ = apply_passes(original, ctx, passes)
        c = cost(prog)
        fid = fidelity(original, prog, ctx.calibration.holdout)
        row.measured_flops = c.flops / base.flops if base.flops else None
        row.measured_mb = c.weight_bytes / 1e6
        row.measured_drop = fid.cosine_drop if fid else None
        ok = True
        if budget.latency is not None:
            row.measured_latency = latency_fn(prog) / base_latency
            ok &= row.measured_latency <= budget.latency * (1 + tolerance)
        if budget.size_mb is not None:
            ok &= row.measured_mb <= budget.size_mb
        if budget.flops is not None:
            ok &= (row.measured_flops or 0) <= budget.flops * (1 + tolerance)
        row.verdict = "chosen" if ok else "rejected: measured cost over budget"
        tried.append(row)
        if ok:
            for other, _ in plans[len(tried):len(tried) + 5]:
                other.verdict = "not built: larger predicted drop"
                tried.append(other)
            return Allocation(prog, passes, knobs, tried)
    raise PassError("the budget allocator built its best plans but none met the budget when measured: "
                    + "; ".join(f"{'+'.join(r.knobs)} -> latency {r.measured_latency}, {r.measured_mb:.1f} MB" for r in tried))


def _rank_plans(knobs: list[Knob], base_bytes: int, budget: BudgetSpec) -> list[tuple[PlanRow, list[Knob]]]:
    by_tech: dict[str, list[Knob | None]] = {}
    for k in knobs:
        by_tech.setdefault(k.technique, [None]).append(k)
    out = []
    for combo in itertools.product(*by_tech.values()):
        chosen = [k for k in combo if k is not None]
        if not chosen:
            continue
        lat = math.prod(k.latency_ratio for k in chosen)
        flops = math.prod(k.flops_ratio for k in chosen)
        mb = (base_bytes - _bytes_saved(chosen, base_bytes)) / 1e6
        drop = sum(k.cosine_drop for k in chosen)
        if budget.latency is not None and lat > budget.latency:
            continue
        if budget.size_mb is not None and mb > budget.size_mb:
            continue
        if budget.flops is not None and flops > budget.flops:
            continue
        out.append((PlanRow(knobs=[k.name for k in chosen], predicted_latency=lat, predicted_flops=flops,
                            predicted_mb=mb, predicted_drop=drop), chosen))
    out.sort(key=lambda item: item[0].predicted_drop)
    return out


def _bytes_saved(chosen: list[Knob], base_bytes: int) -> int:
    """Savings compose multiplicatively: each knob keeps a fraction of what the others left."""
    kept = 1.0
    for k in chosen:
        kept *= max(0.0, 1.0 - k.bytes_saved / base_bytes) if base_bytes else 1.0
    return int(base_bytes * (1 - kept))
