"""Layer importance: one score per block (or per residual branch); higher = more important.

Kinds:
- `block_influence` (ShortGPT's BI): 1 - cos(hidden in, hidden out) of the region, per
  token (per spatial position for NCHW feature maps), averaged over real tokens (padding
  excluded by the statistics service's policy, `rewrite.statistics`). A region that barely changes the
  residual stream scores low.
- `outlier_fraction`: fraction of the region's linear/conv weights with |z| > 1, z taken
  over the region's pooled weight distribution. `module_outlier_fraction` gives the same
  per linear module (z over that module's weight), for mixed-precision allocation.
- `fidelity_drop`: 1 - cos(final output with the region skipped, `original`'s final
  output), per token, averaged over real tokens of all batches. The skip is done on a
  copy of the graph (parameters shared), exactly as the skip pass would do it.
- `next_token_nll` (causal LMs): the increase of the mean next-token negative log-likelihood of
  the calibration tokens over `original`'s when the region is bypassed. It scores what a
  language model is for, where fidelity_drop scores the direction of the logits
  (benchmarks/llm_structure.py compares its greedy removal with ShortGPT's choice). Needs batches with `input_ids` and an output holding logits [batch, tokens, vocab].

Regions are found on the graph (`passes.skip_blocks.find_regions`): granularity "block"
keys are block paths (`encoder.layer.3`), "attention"/"mlp" keys are
`<block path>.attention` / `<block path>.mlp`.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from rewrite.calibration import observe
from rewrite.errors import PassError
from rewrite.inputs import Inputs
from rewrite.measure import paired_outputs
from rewrite.program import Program
from rewrite.statistics import output_token_weights, token_weights

from .kinds import REGISTRY, importance, names
from ..skip_blocks import CONV_OPS, Region, weight_of, bypassed, find_regions, no_region_message, resolve



def layer_scores(program: Program, batches: list[Inputs], kind: str, *, granularity: str = "block",
                 blocks: Iterable[str] | None = None, original: Program | None = None) -> dict[str, float]:
    """Score every skippable region of `program` (or those whose key/block matches `blocks`).

    `batches` are calibration batches (unused by `outlier_fraction`); `original` is the
    reference for `fidelity_drop` (default: `program` itself).
    """
    cands = find_regions(program, granularity)
    regions = cands.regions
    if blocks is not None:
        pats = list(blocks)
        regions = [r for r in regions if any(fnmatch.fnmatchcase(r.key, p) or fnmatch.fnmatchcase(r.block, p) for p in pats)]
    if not cands.regions:
        raise PassError(no_region_message(program, cands))
    return score_regions(program, regions, batches, kind, original=original)


def score_regions(program: Program, regions: list[Region], batches: list[Inputs], kind: str, *,
                  original: Program | None = None) -> dict[str, float]:
    """Scores of regions found on `program` or on a program it was derived from by skips."""
    if kind not in names("layer"):
        raise PassError(f"unknown layer importance {kind!r}; valid: {', '.join(names('layer'))}")
    return REGISTRY["layer"][kind].fn(program, regions, batches, original or program)


# ------------------------------------------------------------------------ outliers
def outlier_fraction(weights: list[torch.Tensor]) -> float:
    """Fraction of the pooled weights whose |z| exceeds 1 (z over the pooled distribution)."""
    if not weights:
        return 0.0
    w = torch.cat([t.detach().float().reshape(-1) for t in weights])
    if w.numel() < 2:
        return 0.0
    z = (w - w.mean()) / w.std().clamp_min(1e-12)
    return float((z.abs() > 1).float().mean())


def module_outlier_fraction(program: Program, modules: Iterable[str] | None = None) -> dict[str, float]:
    """Per linear module (path -> fraction of its weights with |z| > 1 of its own distribution).

    Linear modules are aten.linear (and GPT-2's Conv1D, an addmm) reading a weight parameter.

    `modules` are globs on module paths; default: every linear module.
    """
    pats = list(modules) if modules is not None else None
    out: dict[str, float] = {}
    for n in program.nodes("call_function"):
        w = weight_of(n)
        if w is None or n.target in CONV_OPS:
            continue
        path = program.module_path(n)
        if pats is not None and not any(fnmatch.fnmatchcase(path, p) for p in pats):
            continue
        out[path] = outlier_fraction([program.param(w)])
    return out


# ------------------------------------------------------------------------ cosines
def feature_dim(t: torch.Tensor) -> int:
    """The dimension a token's (position's) feature vector runs along: 1 for NCHW maps."""
    return 1 if t.dim() == 4 else -1


def token_cosines(a: torch.Tensor, b: torch.Tensor, batch: Inputs, weights: torch.Tensor | None = None) -> tuple[float, float]:
    """(sum of per-token cosines, number of real tokens): padding never counts (the statistics
    service's policy, `rewrite.statistics`). `weights`: the 0/1 token weights when the caller knows
    the value's graph node (`statistics.token_weights`); else found from the shape."""
    d = feature_dim(a)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=d, eps=1e-12)
    m = weights if weights is not None else output_token_weights(batch, a, d)
    if m is None:
        return float(cos.sum()), float(cos.numel())
    return float((cos * m).sum()), float(m.sum())


class _InOut:
    """Subscriber: per-token cosine between each region's residual input and output."""

    def __init__(self, program: Program, regions: list[Region]):
        self.program = program
        by_name = {n.name: n for n in program.graph.nodes}
        self.pairs = {r.key: (by_name[resolve(program, r.stream_in)], by_name[resolve(program, r.stream_out)]) for r in regions}
        self.sums = {k: [0.0, 0.0] for k in self.pairs}
        self.stash: dict[fx.Node, torch.Tensor] = {}

    def nodes(self, program: Program) -> list[fx.Node]:
        return list(dict.fromkeys(n for pair in self.pairs.values() for n in pair))

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
        self.stash[node] = value
        for k, (i, o) in self.pairs.items():
            if node is o and i in self.stash:
                w = token_weights(self.program, o, value, batch, feature_dim(value))
                s, n = token_cosines(self.stash[i], value, batch, w)
                self.sums[k][0] += s
                self.sums[k][1] += n


# ---------------------------------------------------------------- the layer kinds (registration order = spec order)
@importance("layer", "block_influence")
def _block_influence(program: Program, regions: list[Region], batches: list[Inputs], original: Program) -> dict[str, float]:
    """1 - cosine(region input, region output) per token (ShortGPT's Block Influence)."""
    sub = _InOut(program, regions)
    observe(program, batches, [sub], desc="block influence")
    return {k: 1.0 - s / max(n, 1.0) for k, (s, n) in sub.sums.items()}


@importance("layer", "outlier_fraction")
def _outlier_fraction(program: Program, regions: list[Region], batches: list[Inputs], original: Program) -> dict[str, float]:
    """Share of outlier weights in the region (data-free; `outlier_fraction`)."""
    return {r.key: outlier_fraction([program.param(w) for w in r.weights]) for r in regions}


def prediction(out: Any) -> Any:
    """What a layer metric compares: the model's outputs, minus a generation graph's cache state.

    A KV-cache graph returns `logits` plus `present.{i}.key/value`; the presents are the next
    step's input, not the prediction. Averaged in, they bias any output metric toward the last
    blocks (removing block i leaves the presents of blocks before i untouched), so the skip
    search on SmolLM2's cache graph removed blocks 28 and 29 where the logits alone pick 17 and 14.
    """
    if isinstance(out, dict) and "logits" in out and any(str(k).startswith("present.") for k in out):
        return {"logits": out["logits"]}
    return out


def output_cosine(ref: Any, got: Any, batch: Inputs) -> tuple[float, float]:
    """Per-token cosine over every float output leaf of matching shape (the prediction only, see
    `prediction`): (sum, count)."""
    a, b = paired_outputs(prediction(ref), prediction(got))  # by name: a generation graph may have lost skipped layers' cache outputs
    s = n = 0.0
    for x, y in zip(a, b):
        if x.shape == y.shape and x.dim() >= 1:
            ds, dn = token_cosines(x.reshape(1, -1) if x.dim() == 1 else x, y.reshape(1, -1) if y.dim() == 1 else y, batch)
            s, n = s + ds, n + dn
    return s, n


@importance("layer", "fidelity_drop")
def _fidelity_drop(program: Program, regions: list[Region], batches: list[Inputs], original: Program) -> dict[str, float]:
    """1 - output cosine against `original` when the region alone is bypassed.

    Batches are the outer loop, so one reference output is alive at a time: a causal LM's logits
    are tokens x vocabulary (Gemma-3: 1 GB per 2 x 512 batch), and holding every batch's reference
    at once ran a 24 GB machine out of memory."""
    trials = [(r, bypassed(program, [r])) for r in regions]
    s = {r.key: 0.0 for r in regions}
    n = {r.key: 0.0 for r in regions}
    for b in batches:
        ref = original.run(b)
        for r, trial in trials:
            ds, dn = output_cosine(ref, trial.run(b), b)
            s[r.key], n[r.key] = s[r.key] + ds, n[r.key] + dn
        del ref
    return {r.key: 1.0 - s[r.key] / max(n[r.key], 1.0) for r in regions}


def causal_lm_nll(output: Any, batch: Inputs) -> tuple[float, float]:
    """(summed NLL, count) of every real token given the previous ones, from a causal LM's logits.

    The logits are the float output leaf shaped [batch, tokens, vocab] over the batch's
    `input_ids`; a token counts when it and the one before it are real (attention_mask).
    """
    ids = batch.kwargs.get("input_ids")
    if ids is None:
        ids = next((t for t in batch.args if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
    logits = None
    if ids is not None and ids.dim() == 2:
        logits = next((t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
                       and t.dim() == 3 and tuple(t.shape[:2]) == tuple(ids.shape) and t.shape[-1] > int(ids.max())), None)
    if logits is None:
        raise PassError("layer importance next_token_nll needs a causal language model: calibration batches with "
                        "input_ids [batch, tokens] and an output holding logits [batch, tokens, vocab]; "
                        "fix: use fidelity_drop or block_influence for other models")
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None].long()).squeeze(-1).double()
    mask = batch.kwargs.get("attention_mask")
    if mask is None:
        return float(nll.sum()), float(nll.numel())
    valid = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return float((nll * valid).sum()), float(valid.sum())


def mean_nll(program: Program, batches: list[Inputs]) -> float:
    """Mean next-token NLL of `program` (a causal LM) over the real tokens of `batches`."""
    s = n = 0.0
    for b in batches:
        ds, dn = causal_lm_nll(program.run(b), b)
        s, n = s + ds, n + dn
    return s / max(n, 1.0)


@importance("layer", "next_token_nll")
def _next_token_nll(program: Program, regions: list[Region], batches: list[Inputs], original: Program) -> dict[str, float]:
    """Mean next-token NLL with the region alone bypassed, minus `original`'s (causal LMs)."""
    base = mean_nll(original, batches)
    return {r.key: mean_nll(bypassed(program, [r]), batches) - base for r in regions}


def mean_output_cosine(original: Program, program: Program, batches: list[Inputs]) -> float:
    """Per-token output cosine of `program` against `original`, averaged over real tokens."""
    s = n = 0.0
    for b in batches:
        ds, dn = output_cosine(original.run(b), program.run(b), b)
        s, n = s + ds, n + dn
    return s / max(n, 1.0)
