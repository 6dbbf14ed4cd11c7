"""Block-level tools for the LLM structure benchmark: cached block inputs, block influence, greedy removal.

A decoder's blocks are run one by one from their recorded inputs (`llm_sim.catch_layer_inputs`
records block 0's hidden states and every block's keyword arguments: masks, rotary tables), so
a question about block i ("what if it were removed / quantized?") costs only the blocks after
it plus the head, not a whole forward. Used by `benchmarks/llm_structure.py`:

- `block_influence`: ShortGPT's BI, 1 - cos(block input, block output) per token, averaged
  over every token of the calibration batches (no padding: every token is real);
- `greedy_removal`: remove one block at a time, each time the one whose removal gives the
  lowest NLL on held-back text (the search is selected on wiki-train text, never dev);
- `single_block_sensitivity`: NLL increase on held-back text when only block i is changed
  (e.g. quantized to low bits): a layer-importance order for mixed precision.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

import llm_sim


def final_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The head on the last block's output: final norm, lm_head (and logit soft-capping where the config has it)."""
    base = getattr(model, "model", model)
    logits = model.lm_head(base.norm(h))
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class BlockRunner:
    """Runs the blocks of a HF decoder from recorded inputs, with any subset of blocks kept."""

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor]):
        self.model = model
        self.layers = llm_sim.decoder_layers(model)
        self.batches = list(batches)
        with torch.inference_mode():
            self.h0, self.kws = llm_sim.catch_layer_inputs(model, self.batches)

    def run(self, h: list[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states after running the blocks `layers` (indices, in order) on `h` (one tensor per batch)."""
        with torch.inference_mode():
            for i in layers:
                h = [self.layers[i](x, **kw) for x, kw in zip(h, self.kws[i])]
        return h

    def nll(self, h: list[torch.Tensor]) -> float:
        """Mean next-token NLL of the batches given the last block's outputs `h` (the data recipe's windows)."""
        from rewrite import llm_data

        total, count = 0.0, 0
        with torch.inference_mode():
            for x, ids in zip(h, self.batches):
                s, c = llm_data.window_nll(final_logits(self.model, x), ids)
                total, count = total + s, count + c
        return total / count

    def inputs(self, keep: Sequence[int]) -> dict[int, list[torch.Tensor]]:
        """Each kept block's input hidden states when only `keep` run (in order)."""
        out: dict[int, list[torch.Tensor]] = {}
        h = self.h0
        for i in keep:
            out[i] = h
            h = self.run(h, [i])
        out[-1] = h
        return out


def block_influence(runner: BlockRunner, updates: list[torch.Tensor] | None = None) -> list[float]:
    """ShortGPT's block influence: mean over tokens of 1 - cos(h_in, h_out) for every block (float model).

    With `updates` (a list), each block's mean residual update E[h_out - h_in] over the tokens is
    appended to it (what `MeanUpdate` adds in place of a removed block).
    """
    scores = []
    h = runner.h0
    for i in range(len(runner.layers)):
        out = runner.run(h, [i])
        num = sum(float((1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)).sum())
                  for a, b in zip(h, out))
        tokens = sum(a.shape[0] * a.shape[1] for a in h)
        scores.append(num / tokens)
        if updates is not None:
            updates.append(sum((b.float() - a.float()).sum(dim=(0, 1)) for a, b in zip(h, out)) / tokens)
        h = out
    return scores


class MeanUpdate(nn.Module):
    """Stands in for a removed block: adds the block's mean residual update (a constant vector)."""

    def __init__(self, update: torch.Tensor):
        super().__init__()
        self.register_buffer("update", update.detach().clone())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.update.to(hidden_states.dtype)


def replace_blocks(model: nn.Module, blocks: Sequence[int], updates: Sequence[torch.Tensor]) -> nn.Module:
    """The model with each of `blocks` replaced by its `MeanUpdate` (in place)."""
    layers = llm_sim.decoder_layers(model)
    for i in blocks:
        layers[i] = MeanUpdate(updates[i])
    return model


def shortgpt_choice(bi: Sequence[float], k: int) -> list[int]:
    """ShortGPT: the k blocks with the lowest block influence, removed at once."""
    return sorted(range(len(bi)), key=lambda i: bi[i])[:k]


def greedy_removal(runner: BlockRunner, k: int, log: Callable[[str], None] = lambda s: None,
                   shortlist: int | None = None) -> tuple[list[int], list[float]]:
    """Remove k blocks one at a time, each the one whose removal gives the lowest held-back NLL.

    Returns the blocks in removal order and the NLL after each removal. The inputs of every kept
    block are cached once per step, so a candidate costs the blocks after it and the head. With
    `shortlist`, steps after the first consider only the `shortlist` blocks whose removal alone
    cost least in the first step (on shared CPUs a full greedy over 30 blocks costs ~4x more).
    """
    n = len(runner.layers)
    removed: list[int] = []
    path: list[float] = []
    pool = list(range(n))
    for step in range(k):
        keep = [i for i in range(n) if i not in removed]
        cached = runner.inputs(keep)
        best, best_nll = None, float("inf")
        scores: dict[int, float] = {}
        for pos, i in enumerate(keep):
            if i not in pool:
                continue
            nll = scores[i] = runner.nll(runner.run(cached[i], keep[pos + 1:]))
            if nll < best_nll:
                best, best_nll = i, nll
        if step == 0 and shortlist:
            pool = sorted(scores, key=scores.get)[:shortlist]
        removed.append(best)
        path.append(best_nll)
        log(f"greedy step {step + 1}: remove block {best}, held-back nll {best_nll:.4f}")
    return removed, path


def fit_stand_in(inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor | None:
    """The skip pass's linear stand-in [M; b] for x -> target (one fold per batch, ridge cross-validated;
    `rewrite.passes.skip_compensate.fit_map`), None when plain removal wins."""
    from rewrite.passes.skip_compensate import add_rows, fit_map, update_rows

    folds = [add_rows(None, *update_rows(x, y)) for x, y in zip(inputs, targets)]
    theta, _ = fit_map(folds)
    return theta


def _apply_stand_in(h: list[torch.Tensor], theta: torch.Tensor | None) -> list[torch.Tensor]:
    if theta is None:
        return h
    m, b = theta[:-1].to(h[0].dtype), theta[-1].to(h[0].dtype)
    return [x + x @ m + b for x in h]


def stand_in_greedy(calib: BlockRunner, held: BlockRunner, k: int, log: Callable[[str], None] = lambda s: None,
                    shortlist: int | None = None) -> tuple[list[int], list[float]]:
    """Greedy removal where every candidate is scored WITH its linear stand-in: at each step, for each
    kept block, fit the stand-in on the calibration inputs the current model gives it (towards the float
    block's output on the float stream), and score the held-back NLL with it in place. Earlier stand-ins
    stay as fitted (the skip pass refits the final set in graph order). Returns (blocks in order, NLL path)."""
    n = len(calib.layers)
    with torch.inference_mode():
        refs, h = [], calib.h0
        for i in range(n):  # the float model's block outputs on the float stream: the targets
            h = calib.run(h, [i])
            refs.append(h)
    chosen: dict[int, torch.Tensor | None] = {}

    def block(runner: BlockRunner, i: int, h: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block i as the current choice has it: its stand-in when chosen, else the block itself."""
        with torch.inference_mode():
            return _apply_stand_in(h, chosen[i]) if i in chosen else runner.run(h, [i])

    def inputs_of(runner: BlockRunner) -> list[list[torch.Tensor]]:
        out, h = [], runner.h0
        for i in range(n):
            out.append(h)
            h = block(runner, i, h)
        return out

    def rest(runner: BlockRunner, h: list[torch.Tensor], start: int) -> list[torch.Tensor]:
        for j in range(start, n):
            h = block(runner, j, h)
        return h

    order: list[int] = []
    path: list[float] = []
    pool = list(range(n))
    for step in range(k):
        cal_in, held_in = inputs_of(calib), inputs_of(held)
        scores: dict[int, tuple[float, torch.Tensor | None]] = {}
        for i in pool:
            if i in chosen:
                continue
            theta = fit_stand_in(cal_in[i], refs[i])
            scores[i] = (held.nll(rest(held, _apply_stand_in(held_in[i], theta), i + 1)), theta)
        best = min(scores, key=lambda i: scores[i][0])
        if step == 0 and shortlist:
            pool = sorted(scores, key=lambda i: scores[i][0])[:shortlist]
        chosen[best] = scores[best][1]
        order.append(best)
        path.append(scores[best][0])
        log(f"stand-in greedy step {step + 1}: block {best}, held-back nll {scores[best][0]:.4f}"
            + (" (no map: removal)" if scores[best][1] is None else ""))
    return order, path


def single_block_sensitivity(runner: BlockRunner, change: Callable[[int], Callable[[], None]]) -> list[float]:
    """Held-back NLL increase when only block i is changed: `change(i)` applies it and returns an undo."""
    n = len(runner.layers)
    cached = runner.inputs(list(range(n)))
    base = runner.nll(cached[-1])
    out = []
    for i in range(n):
        undo = change(i)
        try:
            out.append(runner.nll(runner.run(cached[i], range(i, n))) - base)
        finally:
            undo()
    return out


def remove_blocks(model: nn.Module, blocks: Sequence[int]) -> nn.Module:
    """The model without `blocks` (in place on its layer list; the config's layer count follows)."""
    layers = llm_sim.decoder_layers(model)
    drop = set(blocks)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    base = getattr(model, "model", model)
    base.layers = nn.ModuleList(kept)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]
        cfg.num_hidden_layers = len(kept)
    return model
