"""Importance analysis: scores for weights, channels, neurons, heads, layers and tokens.

Pure functions, higher score = more important. Weight-level kinds (`weight.py`):
magnitude_l1, magnitude_l2 (= magnitude), wanda, hessian, activation, taylor, wina.
Statistics come from one streaming calibration run shared through `PassContext.cache`
(`stats.py`); gradients only for taylor (`gradients.py`). Group scores (heads, neurons,
channels) reduce member scores over the dimension groups of `rewrite.dims`
(`groups.py`). Layer metrics live in `layer.py`, token metrics in `token.py`.

Typical use inside a pass:

    scores = weight_scores(program, ctx.calibration.batches, "wanda", cache=ctx.cache)
    gs = group_scores(find_groups(program), scores, reduce="sum", normalize=True)

Annotation keys (DESIGN §4, one place):

- Per node, `node.meta["rewrite"]["importance"]` on each linear/conv/matmul node:
  `{kind: {"param": weight target, "score": tensor shaped like the weight}}`
  (written by `annotate_weight_scores`; lives until the next recapture).
- Durable, `program.notes["importance"]`:
  - `"modules"`: `{module path: {kind: {"param", "total", "mean", "per_output" [out],
    "per_input" [in]}}}` (`annotate_weight_scores`)
  - `"neurons"`: `{module path: {"param", "wina": [in]}}` (`annotate_neuron_scores`)
  - `"groups"`: `{kind: {group id: {"kind", "layer", "scores": [size]}}}` (`annotate_group_scores`)
  - `"layers"`: `{kind: {block path: float}}` (written by `rewrite inspect` and layer passes)

Report rows for the compile report (put them in `PassResult.details`, lists of dicts render
as tables): `group_rows(groups, gscores, removed=...)` gives, per group, the score range and
the largest removed / smallest kept score of a decision; `module_rows(program, scores)` the
per-weight score totals and ranges. Passes that need the full X^T X (GPTQ) can take it from
`statistics(program, batches, second_moment=True, cache=ctx.cache)[param].input.xtx`.
"""
from . import layer, token  # noqa: F401  (register the layer and token kinds)
from .gradients import distillation_loss, taylor_scores
from .groups import annotate_group_scores, group_rows, group_scores, head_matrix, member_unit_scores
from .neuron import annotate_neuron_scores, column_norms, neuron_scores
from .stats import CACHE_KEY, FeatureStats, Statistics, WeightOp, statistics, weight_ops
from .weight import (KINDS, Scores, all_weight_scores, annotate_weight_scores, canonical_kind, module_rows, module_summary,
                     scores_from_stats, weight_scores)

from .kinds import literal

WeightImportance = literal("weight")
"""The spec type of a weight (or neuron) importance kind: the registered weight kinds."""
LayerImportance = literal("layer")
TokenImportance = literal("token")

__all__ = [
    "WeightImportance", "LayerImportance", "TokenImportance",
    "CACHE_KEY", "FeatureStats", "KINDS", "Scores", "Statistics", "WeightOp", "all_weight_scores",
    "annotate_group_scores", "annotate_neuron_scores", "annotate_weight_scores", "canonical_kind", "column_norms",
    "distillation_loss", "group_rows", "group_scores", "head_matrix", "member_unit_scores", "module_rows", "module_summary",
    "neuron_scores", "scores_from_stats", "statistics", "taylor_scores", "weight_ops", "weight_scores",
]

