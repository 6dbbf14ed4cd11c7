"""Token importance: which tokens of a sequence matter, per input, at a chosen layer.

Kinds (higher = more important):
- `cls_attention`: attention the query token (the first token, CLS; the last token for
  causal decoders, the one whose prediction is made) pays to each token, averaged over heads.
- `attention_rank`: weighted PageRank over the head-averaged attention matrix (Zero-TPrune):
  s <- A^T s from uniform s over real tokens, `RANK_ITERS` steps; a token is important when
  important tokens attend to it.
- `norm`: L2 norm of the token's hidden state (the layer's output).
- `mean_distance`: L2 distance of the token's hidden state from the mean over the row's real
  tokens (for mean-pooled encoders: the tokens nearest the mean move the pooled mean least).
- `pooled_influence`: `mean_distance` x (1 + attention the token receives from the real
  queries): also counts how much the other tokens read it (the choice for mean-pooled encoders).

The attention of fused `scaled_dot_product_attention` is never materialised by the model,
so the scores recompute it from the layer's own q and k (and its mask). Two uses, one
computation (`score_tokens`, plain torch):
- analysis: `token_scores(program, batch, kind, layer=...)` runs the graph once and returns
  [B, S] scores without changing anything;
- graph building: `insert_token_scores(program, kind, layer=...)` emits the same function as
  a node in the graph, so the scores are computed per input at runtime (the token pass).
Padding (where the model's `attention_mask` input is 0) is scored -inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from rewrite.calibration import capture
from rewrite.errors import PassError
from rewrite.inputs import Inputs
from rewrite.program import Block, Program

from .kinds import REGISTRY, importance, names

RANK_ITERS = 10
INFLUENCE_WEIGHT = 1.0
"""Weight of the attention a token receives in `pooled_influence` (each real token receives 1 on average)."""
SDPA = torch.ops.aten.scaled_dot_product_attention.default


# ----------------------------------------------------------------- tensor functions
MASKED = -1e9
"""Logit bias of a masked key. Finite, unlike the model's -inf, so a fully masked row softmaxes to a
uniform row instead of NaN (such rows are padding, scored -inf later) and no NaN clean-up runs over
the [B, H, S, S] attention: onnxruntime spent about 15% of a pruned MiniLM's time on
masked_fill + nan_to_num (Where/IsNaN) at 16x128 tokens."""


def _logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
            is_causal: bool, rows: slice | None = None) -> torch.Tensor:
    """Masked attention logits [B, H, R, S] of the query rows `rows` (all rows when None); the
    mask is turned into an additive bias at its own (broadcast) shape, then added once."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention with enable_gqa
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    S = k.shape[-2]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qr = q if rows is None else q[:, :, rows]
    logits = (qr.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        m = mask if rows is None or mask.shape[-2] == 1 else mask[..., rows, :]
        logits = logits + (_bias(m) if m.dtype == torch.bool else m.float().clamp_min(MASKED))
    if is_causal:
        qi = torch.arange(q.shape[-2], device=q.device)[rows if rows is not None else slice(None)]
        logits = logits + _bias(qi.unsqueeze(-1) >= torch.arange(S, device=q.device).unsqueeze(0))
    return logits


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    """Additive float32 bias of a boolean mask (True = may attend): 0 or `MASKED`."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, MASKED)


def _attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
               is_causal: bool) -> torch.Tensor:
    """[B, Sq, Sk]: the softmax attention, averaged over heads."""
    return torch.softmax(_logits(q, k, mask, scale, is_causal), dim=-1).mean(dim=1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float | None = None,
                  is_causal: bool = False, query: int = 0) -> torch.Tensor:
    """[B, S]: softmax attention of query row `query` (0: CLS, -1: last) over keys, mean over heads."""
    rows = slice(query, query + 1) if query >= 0 else slice(q.shape[-2] + query, q.shape[-2] + query + 1)
    probs = torch.softmax(_logits(q, k, mask, scale, is_causal, rows), dim=-1)
    return probs.mean(dim=1)[:, 0]


def attention_rank(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float | None = None,
                   is_causal: bool = False, valid: torch.Tensor | None = None, iters: int = RANK_ITERS) -> torch.Tensor:
    """[B, S]: weighted PageRank s <- A^T s over the head-averaged attention A [B, S, S] (Zero-TPrune)."""
    A = _attention(q, k, mask, scale, is_causal)
    B, S = A.shape[0], A.shape[-1]
    w = torch.ones(B, S, dtype=A.dtype, device=A.device) if valid is None else valid.to(A.dtype)
    s = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    At = A.transpose(1, 2)
    for _ in range(iters):
        s = (At @ (s * w).unsqueeze(-1)).squeeze(-1)  # padded queries pass on nothing
    return s


def mean_distance(hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[B, S]: L2 distance of each token's hidden state from the mean over the row's real tokens.

    For mean-pooled encoders: dropping a token moves the mean of the rest by its deviation
    from the mean over n - 1, so the tokens nearest the mean are the cheapest to drop.
    """
    h = hidden.float()
    w = torch.ones_like(h[..., 0]) if valid is None else valid.to(h.dtype)
    mean = (h * w.unsqueeze(-1)).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0).unsqueeze(-1)
    return (h - mean).norm(dim=-1)


def pooled_influence(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, hidden: torch.Tensor,
                     valid: torch.Tensor | None, *, scale: float | None = None, is_causal: bool = False,
                     weight: float | None = None) -> torch.Tensor:
    """[B, S]: `mean_distance` x (1 + weight x attention the token receives, summed over the real
    queries, mean over heads).

    For mean-pooled encoders, to first order: dropping token j moves the pooled mean directly by
    its deviation h_j - mean, and again through every later attention, where each query i loses
    the share A_ij it paid to j (pulling its output by about A_ij (h_j - o_i)); summed over the
    queries that is the attention j receives times a similar deviation. `mean_distance` alone
    keeps only the first term; tokens near the mean that others attend to (separators,
    punctuation) are then dropped too readily. all-MiniLM-L6-v2, keep 0.5 after layer 2:
    STS-B train drop 2.19 -> 0.69 (weight 0.5: 0.79, 1: 0.69, 2: 0.93).
    """
    weight = INFLUENCE_WEIGHT if weight is None else weight
    A = _attention(q, k, mask, scale, is_causal)
    if valid is not None:
        A = A * valid.to(A.dtype).unsqueeze(-1)
    received = A.sum(dim=1)
    return mean_distance(hidden, valid) * (1.0 + weight * received)


def hidden_norm(hidden: torch.Tensor) -> torch.Tensor:
    """[B, S]: L2 norm of each token's hidden state."""
    return hidden.float().norm(dim=-1)


# ----------------------------------------------------------------- the token kinds (registration order = spec order)
# source: what a kind reads: "attention" (q, k, mask), "hidden" (the block's hidden states), or both.
@importance("token", "cls_attention", source="attention")
def _cls_attention(q, k, mask, hidden, valid, *, scale, is_causal, query):  # noqa: ANN001, ANN202
    return cls_attention(q, k, mask, scale=scale, is_causal=is_causal, query=query)


@importance("token", "attention_rank", source="attention")
def _attention_rank(q, k, mask, hidden, valid, *, scale, is_causal, query):  # noqa: ANN001, ANN202
    return attention_rank(q, k, mask, scale=scale, is_causal=is_causal, valid=valid)


@importance("token", "norm", source="hidden")
def _norm(q, k, mask, hidden, valid, *, scale, is_causal, query):  # noqa: ANN001, ANN202
    return hidden_norm(hidden)


@importance("token", "mean_distance", source="hidden")
def _mean_distance(q, k, mask, hidden, valid, *, scale, is_causal, query):  # noqa: ANN001, ANN202
    return mean_distance(hidden, valid)


@importance("token", "pooled_influence", source="attention+hidden")
def _pooled_influence(q, k, mask, hidden, valid, *, scale, is_causal, query):  # noqa: ANN001, ANN202
    return pooled_influence(q, k, mask, hidden, valid, scale=scale, is_causal=is_causal)


KINDS = names("token")
HIDDEN_ONLY = tuple(n for n, kind in REGISTRY["token"].items() if kind.source == "hidden")
"""Kinds that read the hidden states only (no attention site needed)."""
READS_HIDDEN = tuple(n for n, kind in REGISTRY["token"].items() if "hidden" in kind.source)


def score_tokens(kind: str, q: torch.Tensor | None, k: torch.Tensor | None, mask: torch.Tensor | None,
                 hidden: torch.Tensor | None, valid: torch.Tensor | None, scale: float | None = None,
                 is_causal: bool = False, query: int = 0) -> torch.Tensor:
    """The scores of one kind, padding at -inf. This function is what the graph runs."""
    if kind not in REGISTRY["token"]:
        raise PassError(f"unknown token importance {kind!r}; use one of {', '.join(KINDS)}")
    s = REGISTRY["token"][kind].fn(q, k, mask, hidden, valid, scale=scale, is_causal=is_causal, query=query)
    if valid is not None:
        s = s.masked_fill(~valid.bool(), float("-inf"))
    return s


# ------------------------------------------------------------------ graph questions
@dataclass
class AttentionSite:
    """The attention op of one block and what the scores read from it."""

    block: Block
    sdpa: fx.Node
    q: fx.Node
    k: fx.Node
    mask: fx.Node | None
    scale: float | None
    is_causal: bool


def block_of(program: Program, layer: int | str) -> Block:
    blocks = program.blocks()
    if not blocks:
        raise PassError("token importance: the model has no repeated blocks (transformer layers) to score tokens at")
    if isinstance(layer, int):
        if not -len(blocks) <= layer < len(blocks):
            raise PassError(f"token importance: layer {layer} is out of range; the model has {len(blocks)} blocks "
                            f"({blocks[0].path} .. {blocks[-1].path})")
        return blocks[layer]
    for b in blocks:
        if b.path == layer:
            return b
    raise PassError(f"token importance: no block {layer!r}; blocks are {', '.join(b.path for b in blocks)}")


def attention_site(program: Program, block: Block) -> AttentionSite:
    """The (last) scaled_dot_product_attention of `block`, with q, k, mask and scale."""
    sdpas = [n for n in block.nodes if n.op == "call_function" and n.target is SDPA]
    if not sdpas:
        raise PassError(f"token importance: block {block.path} has no scaled_dot_product_attention; "
                        "attention-based kinds need one (use importance: norm)")
    node = sdpas[-1]
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, mask = args[0], args[1], node.kwargs.get("attn_mask", args[3])
    is_causal = bool(node.kwargs.get("is_causal", args[5] or False))
    return AttentionSite(block, node, q, k, mask if isinstance(mask, fx.Node) else None,
                         node.kwargs.get("scale"), is_causal)


def padding_input(program: Program, seq_size: Any) -> fx.Node | None:
    """The model's `attention_mask`-like input: an integer/bool [B, S] placeholder (1 = real token)."""
    for ph in program.placeholders():
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.is_floating_point():
            continue
        if "mask" in ph.name and same_size(val.shape[1], seq_size):
            return ph
    return None


def same_size(a: Any, b: Any) -> bool:
    """Equal sizes: equal ints, or SymInts with the same symbolic expression."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return False
    return int(a) == int(b)


def values_of(program: Program, batch: Inputs, nodes: list[fx.Node]) -> dict[fx.Node, Any]:
    """The values of `nodes` on `batch` (no change to the graph)."""
    return capture(program, batch, nodes)


def is_causal_site(program: Program, site: AttentionSite, batch: Inputs | None = None) -> bool:
    """True when the block's attention is causal: is_causal, or a mask where query 0 sees no later key."""
    if site.is_causal:
        return True
    if site.mask is None:
        return False
    mask = values_of(program, batch or program.example, [site.mask])[site.mask]
    if mask.shape[-2] < 2 or mask.shape[-1] < 2:
        return False
    later = mask[..., 0, 1:]
    return bool((~later).all()) if later.dtype == torch.bool else bool((later < -1e4).all())


def token_scores(program: Program, batch: Inputs | Any, kind: str, *, layer: int | str,
                 query: int | None = None) -> torch.Tensor:
    """[B, S] scores of the tokens entering the next layer after `layer` (analysis only).

    `query`: the query row for cls_attention (default: 0, or -1 for causal attention).
    """
    batch = Inputs.of(batch)
    block = block_of(program, layer)
    hidden = block.residual_out
    seq = Program.shape(hidden)[1]
    pad = padding_input(program, seq)
    wanted = [hidden] + ([pad] if pad is not None else [])
    site = None
    if kind not in HIDDEN_ONLY:
        site = attention_site(program, block)
        wanted += [site.q, site.k] + ([site.mask] if site.mask is not None else [])
    vals = values_of(program, batch, wanted)
    causal = site is not None and is_causal_site(program, site, batch)
    if query is None:
        query = -1 if causal else 0
    valid = vals[pad] != 0 if pad is not None else None
    return score_tokens(kind, vals.get(site.q) if site else None, vals.get(site.k) if site else None,
                        vals.get(site.mask) if site and site.mask is not None else None, vals[hidden], valid,
                        site.scale if site else None, bool(site and site.is_causal), query)


def insert_token_scores(program: Program, kind: str, *, site: AttentionSite | None, hidden: fx.Node,
                        valid: fx.Node | None, query: int = 0, after: fx.Node | None = None) -> fx.Node:
    """Emit `score_tokens` as a graph node after `after` (default: `hidden`); returns the [B, S] scores node.

    On the next recapture it is traced into ATen ops (matmul, softmax, mean, ...).
    """
    if kind not in KINDS:
        raise PassError(f"unknown token importance {kind!r}; use one of {', '.join(KINDS)}")
    if kind not in HIDDEN_ONLY and site is None:
        raise PassError(f"token importance {kind!r} needs the block's attention")
    with program.graph.inserting_after(after or hidden):
        node = program.graph.call_function(score_tokens, (
            kind, site.q if site and kind not in HIDDEN_ONLY else None, site.k if site and kind not in HIDDEN_ONLY else None,
            site.mask if site and kind not in HIDDEN_ONLY else None, hidden if kind in READS_HIDDEN else None, valid,
            site.scale if site else None, bool(site and site.is_causal), query))
    return node
