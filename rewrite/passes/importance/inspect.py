"""Importance tables per granularity and plots, without rewriting (the analysis behind `rewrite inspect`).

The command line around it (model loading, files) is `rewrite.cli_inspect`:

    rewrite inspect [SPEC] [--importance KIND ...] [--model MODULE:FACTORY] [--out DIR] [--groups]

Kinds come from `--importance` (repeatable), else from the spec's passes, else a default
set (every metric that needs no gradients). Tables (printed, and written to
`OUT/importance.md` and `OUT/importance.json`):

- layers: per block, each weight kind's share of the model's total score in the block,
  and every layer metric (block influence, outlier fraction, fidelity drop) when
  `passes.importance.layer` is available;
- heads: per attention head (dimension groups of kind head/kv_head), the group score
  (sum over q, k, v and output-projection weights) of each weight kind;
- neurons: per FFN neuron group, min / median / max of each kind (WINA scored on the
  consumer side);
- groups: every dimension group, prunable or not, with each kind's score range;
- tokens: for the first calibration input, the top tokens per layer by each token kind
  (when `passes.importance.token` is available).

Plots (PNG, needs matplotlib): `layers.png` (per-layer bars, one panel per metric) and
`heads_<kind>.png` (per-head heat map, normalised per layer so layers are comparable).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rewrite.errors import RewriteError
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.spec import Spec

from .groups import group_scores, head_matrix
from .stats import weight_ops
from .kinds import names
from .weight import weight_scores

DEFAULT_WEIGHT = ("magnitude", "wanda", "hessian", "activation", "wina")
LM_ONLY_LAYER = ("next_token_nll",)
"""Layer kinds that only apply to causal LMs: listed when asked for (--importance), not by default."""


# ----------------------------------------------------------------------------- kinds
def kinds_from(spec: Spec | None, requested: Sequence[str] | None) -> dict[str, list[str]]:
    """{"weight": [...], "layer": [...], "token": [...]} from --importance, a spec, or defaults."""
    asked: list[str] = []
    if requested:
        asked = list(requested)
    elif spec is not None:
        for p in spec.passes:
            if p.kind == "prune" and p.importance != "obs":  # obs is chosen inside the prune pass's refit
                asked.append(p.importance or ("magnitude" if p.granularity == "channel" else "wanda"))
            elif p.kind in ("skip", "quantize", "token"):
                asked.append(p.importance)
    if not asked:
        return {"weight": list(DEFAULT_WEIGHT), "layer": [k for k in names("layer") if k not in LM_ONLY_LAYER], "token": list(names("token"))}
    out: dict[str, list[str]] = {"weight": [], "layer": [], "token": []}
    for k in asked:
        group = next((g for g in ("weight", "layer", "token") if k in names(g)), None)
        if group is None and k == "obs":
            raise RewriteError("importance 'obs' has no standalone scores: the prune pass computes it while refitting "
                               "each layer (its compile report lists every unit's cost); inspect wanda or hessian instead")
        if group is None:
            valid = ", ".join(n for g in ("weight", "layer", "token") for n in names(g))
            raise RewriteError(f"unknown importance kind {k!r}; valid kinds: {valid}")
        if k not in out[group]:
            out[group].append(k)
    return out


# ----------------------------------------------------------------------------- analysis
def _blocks(program: Program) -> list[str]:
    return [b.path for b in program.blocks()]


def _block_of(module: str, blocks: list[str]) -> str | None:
    for b in sorted(blocks, key=len, reverse=True):
        if module == b or module.startswith(b + "."):
            return b
    return None


def try_groups(program: Program) -> tuple[list[Any] | None, str]:
    try:
        from rewrite.dims import find_groups
    except ImportError:
        return None, "dimension tracking (rewrite.dims) is not available in this build"
    try:
        return find_groups(program), ""
    except Exception as exc:  # analysis of an unusual graph must not stop the other tables
        return None, f"dimension tracking failed on this model: {type(exc).__name__}: {exc}"


def inspect_program(program: Program, batches: list[Inputs], kinds: dict[str, list[str]], *,
                    holdout: list[Inputs] | None = None, task_loss: Any = None, tokenizer: Any = None,
                    cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute every requested metric; returns {"tables": {...}, "heads": {...}, "notes": [...]}."""
    cache = {} if cache is None else cache
    notes: list[str] = []
    blocks = _blocks(program)
    wscores = {k: weight_scores(program, batches, k, task_loss=task_loss, cache=cache) for k in kinds["weight"]}
    by_param = {op.param: op for op in weight_ops(program)}

    # layers ------------------------------------------------------------------------
    layer_rows: list[dict[str, Any]] = [{"layer": b} for b in blocks]
    for k, sc in wscores.items():
        total = sum(float(v.sum()) for v in sc.values()) or 1.0
        per_block = {b: 0.0 for b in blocks}
        for p, v in sc.items():
            b = _block_of(by_param[p].module, blocks)
            if b is not None:
                per_block[b] += float(v.sum())
        for row in layer_rows:
            row[f"{k} share"] = per_block[row["layer"]] / total
    layer_metrics: dict[str, dict[str, float]] = {}
    if kinds["layer"] and blocks:
        try:
            from .layer import layer_scores
        except ImportError:
            notes.append("layer metrics (passes.importance.layer) are not available in this build")
        else:
            for k in kinds["layer"]:
                try:
                    data = holdout if (k == "fidelity_drop" and holdout) else batches
                    layer_metrics[k] = layer_scores(program, data, k)
                except Exception as exc:
                    notes.append(f"layer metric {k} failed: {type(exc).__name__}: {exc}")
            for row in layer_rows:
                for k, vals in layer_metrics.items():
                    row[k] = vals.get(row["layer"])
    if layer_metrics:
        program.notes.setdefault("importance", {}).setdefault("layers", {}).update(layer_metrics)
    for k in layer_metrics:
        vals = {b: v for b, v in layer_metrics[k].items() if v is not None}
        if vals:
            notes.append(f"{k}: least important layer {min(vals, key=vals.get)}")

    # groups, heads, neurons ----------------------------------------------------------
    groups, why = try_groups(program)
    head_rows: list[dict[str, Any]] = []
    neuron_rows: list[dict[str, Any]] = []
    group_rows_: list[dict[str, Any]] = []
    heat: dict[str, tuple[list[str], torch.Tensor]] = {}
    if groups is None:
        notes.append(f"no head/neuron/group tables: {why}")
    else:
        raw = {k: group_scores(groups, sc, "sum", normalize=False) for k, sc in wscores.items()}
        normed = {k: group_scores(groups, sc, "sum", normalize=True) for k, sc in wscores.items()}
        for g in groups:
            row: dict[str, Any] = {"group": g.id, "kind": g.kind, "layer": g.layer or "", "units": g.size, "unit": g.unit,
                                   "prunable": g.prunable}
            for k in wscores:
                v = raw[k].get(g.id)
                if v is not None:
                    row[f"{k} min"], row[f"{k} mean"], row[f"{k} max"] = float(v.min()), float(v.mean()), float(v.max())
            row["reason"] = g.reason
            group_rows_.append(row)
            if g.kind in ("head", "kv_head"):
                for u in range(g.size):
                    hr: dict[str, Any] = {"layer": g.layer or str(g.id), "group": g.id, "head": u, "kind": g.kind}
                    for k in wscores:
                        v = raw[k].get(g.id)
                        hr[k] = float(v[u]) if v is not None else None
                    head_rows.append(hr)
            elif g.kind == "neuron" and g.prunable:
                nr: dict[str, Any] = {"layer": g.layer or "", "group": g.id, "neurons": g.size}
                for k in wscores:
                    v = raw[k].get(g.id)
                    if v is not None:
                        nr[f"{k} min"], nr[f"{k} median"], nr[f"{k} max"] = float(v.min()), float(v.median()), float(v.max())
                neuron_rows.append(nr)
        for k in wscores:
            names, mat = head_matrix(groups, normed[k])
            if mat is not None:
                heat[k] = (names, mat)

    # tokens ----------------------------------------------------------------------------
    token_rows = _token_table(program, batches[0], kinds["token"], blocks, tokenizer, notes) if kinds["token"] and blocks else []

    tables = {"layers": layer_rows, "heads": head_rows, "neurons": neuron_rows, "groups": group_rows_, "tokens": token_rows}
    return {"tables": tables, "heads": heat, "layer_metrics": layer_metrics, "notes": notes, "groups": groups}


def _token_table(program: Program, batch: Inputs, kinds: list[str], blocks: list[str], tokenizer: Any,
                 notes: list[str]) -> list[dict[str, Any]]:
    try:
        from .token import token_scores
    except ImportError:
        notes.append("token metrics (passes.importance.token) are not available in this build")
        return []
    ids = batch.kwargs.get("input_ids")
    rows = []
    for k in kinds:
        for i, b in enumerate(blocks):
            try:
                s = token_scores(program, batch, k, layer=i)[0]
            except Exception as exc:
                notes.append(f"token metric {k} failed at {b}: {type(exc).__name__}: {exc}")
                break
            finite = torch.isfinite(s)
            order = [int(j) for j in torch.argsort(torch.where(finite, s, torch.full_like(s, -float("inf"))), descending=True)
                     if finite[j]][:5]
            label = [_token_label(ids, tokenizer, j) for j in order]
            rows.append({"kind": k, "layer": b, "top tokens (first input)": " ".join(label),
                         "top scores": ", ".join(f"{float(s[j]):.3g}" for j in order)})
    return rows


def _token_label(ids: Any, tokenizer: Any, j: int) -> str:
    if tokenizer is not None and isinstance(ids, torch.Tensor):
        return f"{tokenizer.convert_ids_to_tokens(int(ids[0, j]))}@{j}"
    return str(j)


# ----------------------------------------------------------------------------- output
def render(tables: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    for name, rows in tables.items():
        if not rows:
            continue
        cols: list[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        out += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per-layer bars and per-head heat maps as PNG files; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RewriteError("plots need matplotlib: pip install 'rewrite[plot]'") from None
    written = []
    rows = result["tables"]["layers"]
    metrics = [c for c in (rows[0] if rows else {}) if c != "layer" and any(r.get(c) is not None for r in rows)]
    if metrics:
        fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.6 * len(rows)), 2.2 * len(metrics)), squeeze=False)
        names = [r["layer"].rsplit(".", 1)[-1] for r in rows]
        for ax, m in zip(axes[:, 0], metrics):
            ax.bar(range(len(rows)), [r.get(m) or 0.0 for r in rows], color="tab:blue")
            ax.set_ylabel(m, fontsize=8)
            ax.set_xticks(range(len(rows)), names, fontsize=7)
        axes[-1, 0].set_xlabel("layer")
        fig.tight_layout()
        path = out_dir / "layers.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for kind, (names, mat) in result["heads"].items():
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * mat.shape[1] + 2), max(2.5, 0.35 * mat.shape[0] + 1)))
        im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("head")
        ax.set_title(f"{kind} head importance (normalised per layer)", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heads_{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def jsonable(tables: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return json.loads(json.dumps(tables, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
