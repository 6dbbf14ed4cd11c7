"""`token`: drop (or merge) low-importance tokens after chosen layers, inside the graph.

At each selection point (the residual output r of a block) the pass inserts:
  scores = score_tokens(kind, q, k, mask, r, valid)      # per input, [B, S], padding -inf
  idx    = rewrite::token_select(scores, keep, first, last)   # [B, k], ascending
  r'     = gather(r, idx)  or  merge_tokens(r, idx, k, valid) (ToMe-style)
and replaces r by r' downstream. Then it makes every later tensor consistent: the region
downstream of r' is computed from r', so only the tensors that *enter* that region from
outside need changing. Each such input whose shape has the sequence size on some dims
(the attention mask [B, 1, Sq, Sk] on both, rotary cos/sin [1, S, d], position biases,
the padding mask) is gathered by idx along those dims; a sequence-length scalar is re-read
from r'. Sequence dims are found from the captured shapes (the symbol of the sequence
length, or its value for static lengths), not from model classes; `rewrite/dims.py` is not
used (the sequence axis is tracked here, from the residual stream downstream).

`restore` puts kept tokens back in their positions after the last block (dropped tokens keep
the state they had when they were dropped), so per-token outputs keep their length.
The ops are inserted as calls to the plain-torch functions below; the recapture that the
pass manager runs after every pass traces them into ATen ops plus `rewrite::token_select`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import kernels.token  # noqa: F401  (registers rewrite::token_select)
from kernels.token import keep_count
from passes.importance.token import (AttentionSite, attention_site, block_of, insert_token_scores, is_causal_site,
                                     padding_input, same_size)
from rewrite.errors import PassError
from rewrite.passmanager import Pass, PassContext, PassResult, register
from rewrite.program import Program

token_select = torch.ops.rewrite.token_select.default


# ------------------------------------------------------------- ops the graph runs
def gather_seq(x: torch.Tensor, idx: torch.Tensor, dims: list[int], expand_batch: bool = False) -> torch.Tensor:
    """x gathered by idx [B, k] along each dim in `dims` (dim 0 is the batch)."""
    B, k = idx.shape[0], idx.shape[1]
    if expand_batch:
        x = x.expand(B, *x.shape[1:])
    for d in dims:
        view = [1] * x.dim()
        view[0], view[d] = B, k
        target = list(x.shape)
        target[0], target[d] = B, k
        x = torch.gather(x, d, idx.reshape(view).expand(target))
    return x


def merge_tokens(x: torch.Tensor, idx: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """ToMe-style merge: each dropped token is averaged into its most similar kept token.

    Similarity: cosine of the layer's keys averaged over heads. Padding merges into nothing;
    a kept token's new state is the mean of itself and the real tokens assigned to it.
    """
    B, S, H = x.shape
    metric = keys.float().mean(dim=1) if keys.dim() == 4 else keys.float()
    metric = torch.nn.functional.normalize(metric, dim=-1)
    kept_metric = gather_seq(metric, idx, [1])
    assign = (metric @ kept_metric.transpose(1, 2)).argmax(dim=-1)  # [B, S] -> kept slot
    kept = torch.zeros(B, S, dtype=torch.bool, device=x.device).scatter(1, idx, True)
    rank = kept.long().cumsum(dim=1) - 1
    assign = torch.where(kept, rank, assign)
    real = torch.ones_like(kept) if valid is None else valid.bool()
    w = torch.where(kept, torch.ones_like(x[..., 0]), real.to(x.dtype))
    num = x.new_zeros(B, idx.shape[1], H).scatter_add(1, assign.unsqueeze(-1).expand(B, S, H), x * w.unsqueeze(-1))
    den = x.new_zeros(B, idx.shape[1]).scatter_add(1, assign, w)
    return num / den.unsqueeze(-1)


def restore_seq(base: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """base [B, S, H] with rows idx [B, k] replaced by y [B, k, H] (kept tokens back in place)."""
    return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), y)


def valid_of(mask: torch.Tensor) -> torch.Tensor:
    return mask != 0


# ------------------------------------------------------------------------ planning
@dataclass
class Stage:
    index: int           # block index after which tokens are selected
    path: str
    keep: float          # fraction of the tokens reaching this point that are kept
    cumulative: float    # fraction of the input tokens kept after this point (before ceil)


def plan_stages(spec: Any, blocks: list) -> list[Stage]:
    """Selection points and their keep ratios from `keep` and `after`.

    - keep: r, after: [L...]   -> keep r of the tokens reaching each listed block output.
    - keep: [r...], after: [L...] (same length) -> cumulative ratios of the input tokens.
    - keep: [r0, r1, ...], after omitted -> per-layer schedule: r_i = cumulative ratio after
      block i (missing tail entries repeat the last); a point wherever the ratio drops.
    - keep: r, after omitted -> one point after block max(0, n//2 - 1).
    """
    n = len(blocks)
    paths = [b.path for b in blocks]

    def index_of(a: int | str) -> int:
        if isinstance(a, int):
            if not -n <= a < n:
                raise PassError(f"token: after={a} is out of range; the model has {n} blocks ({paths[0]} .. {paths[-1]})")
            return a % n
        if a in paths:
            return paths.index(a)
        raise PassError(f"token: after={a!r} names no block; blocks are {', '.join(paths)}")

    keep, after = spec.keep, spec.after
    stages: list[Stage] = []
    if isinstance(keep, list) and after is None:
        if len(keep) > n:
            raise PassError(f"token: the keep schedule has {len(keep)} entries but the model has {n} blocks")
        sched = list(keep) + [keep[-1]] * (n - len(keep))
        prev = 1.0
        for i, r in enumerate(sched):
            if r > prev + 1e-12:
                raise PassError(f"token: the keep schedule must not increase (entry {i}: {r} > {prev})")
            if r < prev - 1e-12:
                stages.append(Stage(i, paths[i], r / prev, r))
                prev = r
    else:
        idxs = [index_of(a) for a in (after if after is not None else [max(0, n // 2 - 1)])]
        if sorted(set(idxs)) != idxs:
            raise PassError(f"token: after must list distinct blocks in increasing order, got {after}")
        if isinstance(keep, list):
            if len(keep) != len(idxs):
                raise PassError(f"token: keep has {len(keep)} ratios but after has {len(idxs)} points; give one ratio "
                                "per point, a single ratio, or omit after for a per-layer schedule")
            prev = 1.0
            for i, r in zip(idxs, keep):
                if r > prev + 1e-12:
                    raise PassError(f"token: cumulative keep ratios must not increase ({r} > {prev})")
                stages.append(Stage(i, paths[i], r / prev, r))
                prev = r
        else:
            cum = 1.0
            for i in idxs:
                cum *= keep
                stages.append(Stage(i, paths[i], float(keep), cum))
    stages = [s for s in stages if s.keep < 1.0]
    for s in stages:
        if s.index == n - 1:
            raise PassError(f"token: selecting tokens after the last block ({s.path}) saves no compute; "
                            "choose an earlier block in `after`")
    return stages


# ------------------------------------------------------------------------ rewrite
def _descendants(start: fx.Node, stop: fx.Node | None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                if u is not stop:
                    todo.append(u)
    return seen


def _seq_dims(node: fx.Node, seq: Any, known: dict[fx.Node, list[int]]) -> list[int]:
    if node in known:
        return known[node]
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [d for d, s in enumerate(val.shape) if same_size(s, seq)]
    return []


def _is_seq_scalar(node: fx.Node, seq: Any) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) and same_size(val, seq)


@register
class TokenPass(Pass):
    kind = "token"
    establishes = frozenset({"tokens-pruned"})

    def check(self, program: Program, ctx: PassContext) -> None:
        if not program.blocks():
            raise PassError("token: the model has no repeated blocks (transformer layers); token pruning needs them")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        spec = self.spec
        blocks = program.blocks()
        stages = plan_stages(spec, blocks)
        if not stages:
            return PassResult(program, summary="nothing to do: every keep ratio is 1.0")
        graph = program.graph
        first_r = blocks[stages[0].index].residual_out
        seq = Program.shape(first_r)[1]
        seq_example = Program.concrete_shape(first_r)[1]
        last_r = blocks[-1].residual_out
        need_site = spec.importance != "norm" or spec.merge
        causal = is_causal_site(program, attention_site(program, blocks[stages[0].index]))
        keep_first = 1 if spec.keep_special else 0
        keep_last = int(causal if spec.keep_last is None else spec.keep_last)
        query = -1 if causal else 0

        known: dict[fx.Node, list[int]] = {}
        pad = padding_input(program, seq)
        valid: fx.Node | None = None
        if pad is not None:
            with graph.inserting_after(program.placeholders()[-1]):
                valid = graph.call_function(valid_of, (pad,))
            known[valid] = [1]
        restores: list[tuple[fx.Node, fx.Node]] = []
        rows = []
        length = seq_example
        for st in stages:
            block = blocks[st.index]
            r = block.residual_out
            # read the attention's inputs now: earlier selections have replaced its mask by a gathered one
            site: AttentionSite | None = attention_site(program, block) if need_site else None
            scores = insert_token_scores(program, spec.importance, site=site, hidden=r, valid=valid, query=query)
            with graph.inserting_after(scores):
                idx = graph.call_function(token_select, (scores, float(st.keep), keep_first, keep_last))
            with graph.inserting_after(idx):
                if spec.merge:
                    sel = graph.call_function(merge_tokens, (r, idx, site.k, valid))
                else:
                    sel = graph.call_function(gather_seq, (r, idx, [1]))
            new = {scores, idx, sel}
            for u in list(r.users):
                if u not in new:
                    u.replace_input_with(r, sel)
            known[sel] = [1]
            if spec.restore:
                restores.append((r, idx))
            new_valid = None
            if valid is not None:
                with graph.inserting_after(sel):
                    new_valid = graph.call_function(gather_seq, (valid, idx, [1]))
                known[new_valid] = [1]
                new.add(new_valid)
            region = _descendants(sel, last_r if spec.restore else None)
            gathered: dict[fx.Node, fx.Node] = {}
            fixed = []
            for n in [n for n in graph.nodes if n in region]:
                for a in list(n.all_input_nodes):
                    if a in region or a in new or a.op == "get_attr":
                        continue
                    if a in gathered:
                        n.replace_input_with(a, gathered[a])
                        continue
                    if _is_seq_scalar(a, seq):
                        with graph.inserting_before(n):
                            g = graph.call_function(torch.ops.aten.sym_size.int, (sel, 1))
                    else:
                        dims = _seq_dims(a, seq, known)
                        if not dims:
                            continue
                        if 0 in dims:
                            raise PassError(f"token: {a.name} enters the pruned layers with the sequence on dim 0 "
                                            f"(shape {Program.shape(a) if a.meta.get('val') is not None else '?'}); "
                                            "only batch-first tensors can be gathered")
                        val = a.meta.get("val")
                        expand = a not in known and isinstance(val, torch.Tensor) and isinstance(val.shape[0], int) and val.shape[0] == 1
                        with graph.inserting_before(n):
                            g = graph.call_function(gather_seq, (a, idx, dims, expand))
                        known[g] = dims
                        fixed.append(f"{a.name}{list(dims)}")
                    gathered[a] = g
                    n.replace_input_with(a, g)
            k_example = keep_count(length, st.keep, keep_first, keep_last)
            rows.append({"after": st.path, "keep": round(st.keep, 4), "cumulative": round(st.cumulative, 4),
                         "tokens (example)": f"{length} -> {k_example}", "importance": spec.importance,
                         "merge": spec.merge, "gathered": ", ".join(fixed) or "-"})
            length = k_example
            if valid is not None:
                valid = new_valid
        if spec.restore:
            y = last_r
            anchor = last_r
            made = set()
            for base, idx in reversed(restores):
                with graph.inserting_after(anchor):
                    y = graph.call_function(restore_seq, (base, idx, y))
                made.add(y)
                anchor = y
            for u in list(last_r.users):
                if u not in made:
                    u.replace_input_with(last_r, y)
        program.module.recompile()
        notes = [
            f"k = min(S, max(first+last, ceil(keep*S))) per selection (first={keep_first}, last={keep_last}); "
            "padding is scored -inf, so it is dropped before any real token.",
        ]
        if causal:
            notes.append("causal attention detected: the last token is always kept and cls_attention scores "
                         "the attention paid by the last token (prefill only; no KV cache).")
        if not spec.restore:
            notes.append("without restore, per-token outputs are shorter than the input: pool over the kept tokens "
                         "(kept real tokens come first in each row for right-padded batches).")
        summary = (f"{len(stages)} selection point(s) ({', '.join(s.path for s in stages)}), "
                   f"tokens kept {rows[0]['tokens (example)'].split(' -> ')[0]} -> {length} on the example, "
                   f"importance {spec.importance}{', merge' if spec.merge else ''}{', restore' if spec.restore else ''}")
        return PassResult(program, summary=summary, details={"selections": rows}, notes=notes)
