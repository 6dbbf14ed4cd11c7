"""`token`: drop (or merge) low-importance tokens after chosen layers, inside the graph.

At each selection point (the residual output r of a block) the pass inserts:
  scores = score_tokens(kind, q, k, mask, r, valid)      # per input, [B, S], padding -inf
  idx    = rewrite::token_select(scores, keep, first, last)   # [B, k], ascending
  r'     = gather(r, idx)  or, with merge (ToMe), the size-weighted average of each kept token
           and the dropped real tokens most similar to it (merge_assign/_weights/_size/_apply)
and replaces r by r' downstream. Then it makes every later tensor consistent: the region
downstream of r' is computed from r', so only the tensors that *enter* that region from
outside need changing. Each such input whose shape has the sequence size on some dims
(the attention mask [B, 1, Sq, Sk] on both, rotary cos/sin [1, S, d], position biases,
the padding mask) is gathered by idx along those dims; a sequence-length scalar is re-read
from r'. Sequence dims are found from the captured shapes (the symbol of the sequence
length, or its value for static lengths), not from model classes; `rewrite/dims.py` is not
used (the sequence axis is tracked here, from the residual stream downstream).

With merge, each kept token carries a size (how many input tokens it stands for, carried across
selection points) and every later attention adds log(size) to its logits (proportional
attention: a key of size n gets the attention n copies of it would get), through `size_bias`
on the attention's mask. Forced tokens (CLS, the last token of a causal prefill) and padding
absorb nothing. Causal (is_causal) attentions get no size bias.

`restore` puts kept tokens back in their positions after the last block (dropped tokens keep
the state they had when they were dropped), so per-token outputs keep their length.
The ops are inserted as calls to the plain-torch functions below; the recapture that the
pass manager runs after every pass traces them into ATen ops plus `rewrite::token_select`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field
import torch
import torch.fx as fx

import rewrite.kernels.token  # noqa: F401  (registers rewrite::token_select)
from rewrite.kernels.token import keep_count
from rewrite.passes.importance.token import (HIDDEN_ONLY, SDPA, AttentionSite, attention_site, block_of, insert_token_scores, is_causal_site,
                                     padding_input, same_size)
from rewrite.errors import PassError
from rewrite.pass_base import Pass, PassContext, PassResult, Property, register
from rewrite.program import Program
from rewrite.passes.importance import TokenImportance
from rewrite.spec import OpenFraction, StrictModel

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


def _merge_targets(idx: torch.Tensor, B: int, S: int, valid: torch.Tensor | None, keep_first: int,
                   keep_last: int) -> torch.Tensor:
    """[B, k]: which kept slots may absorb dropped tokens (real, and not a forced first/last position)."""
    pos = torch.arange(S, device=idx.device)
    target = ((pos >= keep_first) & (pos < S - keep_last)).unsqueeze(0).expand(B, S)
    if valid is not None:
        target = target & valid.bool()
    return torch.gather(target, 1, idx)


def merge_assign(idx: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, keep_first: int = 0,
                 keep_last: int = 0) -> torch.Tensor:
    """[B, S] -> kept slot (0..k-1) of each token: itself when kept, else its most similar merge target.

    Similarity: cosine of the layer's keys averaged over heads (ToMe). Merge targets are the kept
    real tokens that are not forced (the first `keep_first` / last `keep_last` positions: CLS,
    or the last token of a causal prefill, keep their own state, as ToMe protects CLS); padding
    kept only to fill k absorbs nothing. A row with no target left assigns its dropped tokens
    to slot 0 (`merge_weights` gives them weight 0 there).
    """
    B, S = keys.shape[0], keys.shape[-2]
    metric = keys.float().mean(dim=1) if keys.dim() == 4 else keys.float()
    metric = torch.nn.functional.normalize(metric, dim=-1)
    kept_metric = gather_seq(metric, idx, [1])
    target = _merge_targets(idx, B, S, valid, keep_first, keep_last)
    sim = (metric @ kept_metric.transpose(1, 2)).masked_fill(~target.unsqueeze(1), float("-inf"))
    assign = sim.argmax(dim=-1)  # [B, S] -> kept slot
    kept = torch.zeros(B, S, dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    rank = kept.long().cumsum(dim=1) - 1
    return torch.where(kept, rank, assign)


def merge_weights(idx: torch.Tensor, assign: torch.Tensor, valid: torch.Tensor | None, size: torch.Tensor | None,
                  keep_first: int = 0, keep_last: int = 0) -> torch.Tensor:
    """[B, S] float weight of each token in its slot's average: its size (how many input tokens it
    stands for; 1 before any merge) for kept tokens and for dropped real tokens that have a target,
    0 for dropped padding (and dropped tokens of a row without targets)."""
    B, S = assign.shape
    w = torch.ones(B, S, device=idx.device) if size is None else size.float()
    kept = torch.zeros(B, S, dtype=torch.bool, device=idx.device).scatter(1, idx, True)
    has_target = _merge_targets(idx, B, S, valid, keep_first, keep_last).any(dim=1, keepdim=True)
    real = has_target if valid is None else valid.bool() & has_target
    return torch.where(kept | real, w, torch.zeros_like(w))


def merge_size(assign: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, k] size of each kept slot: the sum of the weights of the tokens assigned to it."""
    return w.new_zeros(w.shape[0], k.shape[1]).scatter_add(1, assign, w)


def merge_apply(x: torch.Tensor, assign: torch.Tensor, w: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """[B, k, H]: each slot's size-weighted average of the states assigned to it."""
    B, S, H = x.shape
    num = x.new_zeros(B, size.shape[1], H).scatter_add(1, assign.unsqueeze(-1).expand(B, S, H), x * w.unsqueeze(-1).to(x.dtype))
    return num / size.unsqueeze(-1).to(x.dtype)


def merge_tokens(x: torch.Tensor, idx: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None,
                 size: torch.Tensor | None = None, keep_first: int = 0, keep_last: int = 0) -> torch.Tensor:
    """ToMe-style merge: each dropped token is averaged into its most similar kept token, weighted
    by size (`merge_assign`, `merge_weights`); the graph runs the same steps as separate nodes."""
    assign = merge_assign(idx, keys, valid, keep_first, keep_last)
    w = merge_weights(idx, assign, valid, size, keep_first, keep_last)
    return merge_apply(x, assign, w, merge_size(assign, w, idx))


def size_bias(mask: torch.Tensor | None, size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention (ToMe): the attention mask plus log(size) of each key.

    A key that stands for n merged tokens gets the attention n copies of it would get.
    mask: boolean (True = attend) or additive, broadcastable to [B, heads, Sq, Sk]; None: no mask.
    """
    bias = size.float().clamp_min(1e-6).log()[:, None, None, :].to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.full_like(bias, float("-inf")))
    return mask.to(dtype) + bias


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


def _sdpa_mask(n: fx.Node) -> Any:
    return n.kwargs["attn_mask"] if "attn_mask" in n.kwargs else (n.args[3] if len(n.args) > 3 else None)


def _set_sdpa_mask(n: fx.Node, mask: Any) -> None:
    if "attn_mask" in n.kwargs or len(n.args) <= 3:
        n.kwargs = {**n.kwargs, "attn_mask": mask}
    else:
        n.args = n.args[:3] + (mask,) + n.args[4:]


def _sdpa_causal(n: fx.Node) -> bool:
    return bool(n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False))


def _first_user_in(m: fx.Node, sdpas: list[fx.Node]) -> fx.Node:
    """The first of `sdpas` (graph order) that reads mask `m`: the size bias goes right before it."""
    return next(n for n in sdpas if _sdpa_mask(n) is m)


def _check_sequence_followed(graph: fx.Graph, region: set[fx.Node], seq: Any, where: str) -> None:
    """Refuse when a layer after the selection point reshapes the token axis together with a static
    dim (a spatial grid [B, H*W, C] -> [B, H, W, C], windows, patches): after gathering k tokens that
    reshape has no valid shape. Merging tokens with the batch ([B, S, H] -> [B*S, H]) is fine."""
    from rewrite.passes.canonicalize import VIEW_OPS, group_dims

    for n in graph.nodes:
        if n not in region or n.op != "call_function" or n.target not in VIEW_OPS:
            continue
        x = n.args[0]
        xv, ov = (x.meta.get("val") if isinstance(x, fx.Node) else None), n.meta.get("val")
        if not isinstance(xv, torch.Tensor) or not isinstance(ov, torch.Tensor):
            continue
        xs, os_ = tuple(xv.shape), tuple(ov.shape)
        seq_dims = [d for d in range(1, len(xs)) if same_size(xs[d], seq)]
        if not seq_dims:
            continue
        runs = group_dims(xs, os_)
        for gi, gj in runs or [(list(range(len(xs))), list(range(len(os_))))]:
            if not set(gi) & set(seq_dims) or (len(gi) == 1 and len(gj) == 1):
                continue
            others = [i for i in gi if i not in seq_dims and i != 0 and not (isinstance(xs[i], int) and xs[i] == 1)]
            split = len(gj) > 1 and any(isinstance(os_[j], int) and os_[j] != 1 for j in gj)
            if others or split or runs is None:
                module = Program.module_path(n) or n.name
                raise PassError(f"token: after {where} the token axis ({xs[seq_dims[0]]} tokens) is reshaped with other "
                                f"dims at {n.name} in {module} ({list(xs)} -> {list(os_)}): the later layers treat tokens "
                                "as a grid (windows, patches, feature maps), so a subset of tokens has no shape there. "
                                "Token pruning applies to models whose later layers treat tokens as a set (ViT, text "
                                "encoders, decoders); choose an `after` block past the last such reshape, or use skip/prune")


def _check_runs(program: Program, ctx: PassContext, where: str) -> None:
    """Run the rewritten graph on the example and the calibration batches: a gather that cannot be
    followed (a sequence-sized tensor the pass did not see) fails here, as a refusal, not later."""
    batches = [program.example] + list(ctx.calibration.batches)[:2] + list(ctx.calibration.holdout)[:1]
    for i, batch in enumerate(batches):
        try:
            program.run(batch)
        except Exception as exc:  # noqa: BLE001 - any failure means the sequence axis was not followed
            what = "the example inputs" if i == 0 else f"calibration batch {i - 1}"
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise PassError(f"token: after selecting tokens at {where}, the graph fails on {what} "
                            f"({type(exc).__name__}: {first}): some tensor indexed by token position is not "
                            "recognised as sequence-shaped, so token pruning cannot apply to this model "
                            "(or choose a later `after` block)") from exc


# --------------------------------------------------------------------------- spec
class TokenSpec(StrictModel):
    """Drop (or merge) low-importance tokens after chosen layers, inside the graph."""

    kind: Literal["token"] = "token"
    keep: Union[OpenFraction, Annotated[list[Annotated[float, Field(gt=0.0, le=1.0)]], Field(min_length=1)]] = 0.7
    after: list[Union[int, str]] | None = None
    importance: TokenImportance = "cls_attention"
    keep_special: bool = True
    keep_last: bool | None = None
    """Always keep the last token; None: on for causal decoders (detected from the attention mask)."""
    merge: bool = False
    restore: bool = False


@register
class TokenPass(Pass):
    spec_class = TokenSpec
    establishes = frozenset({Property.TOKENS_PRUNED})

    def check(self, program: Program, ctx: PassContext) -> None:
        blocks = program.blocks()
        if not blocks:
            raise PassError("token: the model has no repeated blocks (transformer layers); token pruning needs them")
        r = blocks[0].residual_out
        shape = Program.shape(r) if r is not None else None
        if shape is None or len(shape) != 3:
            raise PassError(f"token: the main output of the blocks of {blocks[0].list_path} (their largest float output) "
                            f"is {list(shape) if shape else 'no tensor'}, not [batch, tokens, hidden]; token pruning follows "
                            "a residual stream of token vectors (ViT, text encoders, decoders), not feature maps or "
                            "per-head biases; use prune or skip for this model")

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
        need_site = spec.importance not in HIDDEN_ONLY or spec.merge
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
        size: fx.Node | None = None  # [B, k] tokens each kept token stands for (merge), None: all 1
        biased: dict[fx.Node, Any] = {}  # size_bias node -> the mask it was made from
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
            new = {scores, idx}
            if spec.merge:
                with graph.inserting_after(idx):
                    assign = graph.call_function(merge_assign, (idx, site.k, valid, keep_first, keep_last))
                with graph.inserting_after(assign):
                    w = graph.call_function(merge_weights, (idx, assign, valid, size, keep_first, keep_last))
                with graph.inserting_after(w):
                    size = graph.call_function(merge_size, (assign, w, idx))
                with graph.inserting_after(size):
                    sel = graph.call_function(merge_apply, (r, assign, w, size))
                known[size] = [1]
                new |= {assign, w, size}
            else:
                with graph.inserting_after(idx):
                    sel = graph.call_function(gather_seq, (r, idx, [1]))
            new.add(sel)
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
            _check_sequence_followed(graph, region, seq, st.path)
            sdpas = [n for n in graph.nodes if n in region and n.op == "call_function" and n.target is SDPA]
            if spec.merge:  # the masks of later attentions carry log(size) of an earlier merge: start from the plain mask
                for n in sdpas:
                    m = _sdpa_mask(n)
                    if m in biased:
                        _set_sdpa_mask(n, biased[m])
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
            if spec.merge:  # proportional attention: keys that stand for n tokens get log(n) added to their logits
                made: dict[Any, fx.Node] = {}
                for n in sdpas:
                    if _sdpa_causal(n):
                        continue
                    m = _sdpa_mask(n)
                    if m not in made:
                        with graph.inserting_before(sdpas[0] if m is None else _first_user_in(m, sdpas)):
                            made[m] = graph.call_function(size_bias, (m, size, n.args[0].meta["val"].dtype))
                        biased[made[m]] = m
                    _set_sdpa_mask(n, made[m])
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
        _check_runs(program, ctx, stages[0].path)
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
