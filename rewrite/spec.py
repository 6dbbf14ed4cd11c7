"""The compression spec: what the user asks for, validated before any work is done.

A spec is a list of passes applied in order, plus calibration, verification and export
settings. Every model forbids unknown fields; pass specs form a discriminated union on
`kind`. Errors are turned into one short `SpecError` naming the field path, the value
and what would be valid (see `_explain`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SpecError

# Importance kinds, by the granularity they score. Names are the spec's vocabulary.
WEIGHT_IMPORTANCE = ("magnitude", "magnitude_l1", "magnitude_l2", "wanda", "taylor", "hessian", "activation")
NEURON_IMPORTANCE = ("wina",)
LAYER_IMPORTANCE = ("block_influence", "outlier_fraction", "fidelity_drop")

WeightImportance = Literal["magnitude", "magnitude_l1", "magnitude_l2", "wanda", "taylor", "hessian", "activation", "wina"]
LayerImportance = Literal["block_influence", "outlier_fraction", "fidelity_drop"]
TokenImportance = Literal["cls_attention", "attention_rank", "norm", "mean_distance", "pooled_influence"]
TOKEN_IMPORTANCE = get_args(TokenImportance)
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- settings
class CalibrationSpec(StrictModel):
    """How many calibration samples to use, in which batches, and how many to hold back."""

    samples: Annotated[int, Field(ge=1)] = 128
    batch_size: Annotated[int, Field(ge=1)] = 16
    seed: int = 0
    holdout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.125
    """Fraction of calibration batches kept back to measure fidelity (at least one batch)."""


class VerifySpec(StrictModel):
    """Tolerances for the numeric checks after each pass and after export."""

    max_cosine_drop: Annotated[float, Field(ge=0.0, le=2.0)] = 0.05
    """Largest allowed 1 - cosine(original, rewritten) on held-back batches before a warning."""
    fail_on_fidelity: bool = False
    """Raise instead of warn when a pass exceeds max_cosine_drop."""
    backend_rtol: Annotated[float | None, Field(gt=0.0)] = None
    """Largest allowed relative error between a backend (onnxruntime, TVM) and the torch module.
    Default 1e-4; graphs with int8 activations default to a looser check (`kernels.quant.INT8_ACTIVATION_CHECK`)."""
    backend_quantile: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    """Fraction of output values that must be within backend_rtol (1.0: all; default 1.0, or the int8 default)."""


class OnnxExportSpec(StrictModel):
    opset: Annotated[int, Field(ge=18, le=23)] = 21
    dynamic: bool = True
    """Keep batch and sequence dimensions dynamic in the exported model."""
    external_data: Literal["auto", True, False] = "auto"
    """Store weights next to the model file; 'auto' does so above 1 GiB of weights."""
    debug_metadata: bool = False
    """Keep torch's per-node metadata (stack traces, module scopes): about 2.5 KB per node, so
    off by default; turn on to trace an ONNX node back to the Python line that made it."""


class ExportSpec(StrictModel):
    onnx: OnnxExportSpec = OnnxExportSpec()


class BudgetSpec(StrictModel):
    """A whole-model target the allocator meets by choosing the rewrites jointly."""

    latency: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    """Latency as a ratio of the original, measured on the target runtime."""
    size_mb: Annotated[float | None, Field(gt=0.0)] = None
    flops: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    """FLOPs as a ratio of the original."""

    @model_validator(mode="after")
    def _one_target(self) -> "BudgetSpec":
        if self.latency is None and self.size_mb is None and self.flops is None:
            raise ValueError("give at least one of latency, size_mb, flops")
        return self


# --------------------------------------------------------------------------- passes
class CleanupSpec(StrictModel):
    """Dropout removal, constant folding, batch-norm folding and dead-code elimination."""

    kind: Literal["cleanup"] = "cleanup"
    dropout: bool = True
    fold_constants: bool = True
    fold_batchnorm: bool = True


class PruneBudget(StrictModel):
    """Fraction of the whole model's params or FLOPs to keep."""

    params: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    flops: Annotated[float | None, Field(gt=0.0, le=1.0)] = None

    @model_validator(mode="after")
    def _one(self) -> "PruneBudget":
        if (self.params is None) == (self.flops is None):
            raise ValueError("give exactly one of params, flops")
        return self


class PruneSpec(StrictModel):
    """Remove coupled groups (structured) or mask weights (unstructured, N:M)."""

    kind: Literal["prune"] = "prune"
    granularity: Literal["channel", "neuron", "head", "unstructured", "n:m"]
    amount: Annotated[float | None, Field(ge=0.0, lt=1.0)] = None
    """Fraction removed within scope."""
    budget: PruneBudget | None = None
    importance: WeightImportance | Literal["obs"] | None = None
    """Defaults per granularity: wanda for neuron/head/unstructured/n:m, magnitude for channel.
    `obs` (heads and neurons read by a linear layer): structured Optimal Brain Surgeon, each layer
    drops the units its least-squares refit recovers best (implies compensate: lstsq)."""
    scope: list[str] | None = None
    """Module globs; default: everything prunable except embeddings, output head and residual width."""
    exclude: list[str] = []
    allocation: Literal["uniform", "global"] | None = None
    """None: the granularity's default (passes/prune_plan.py, chosen on held-out train data)."""
    max_per_layer: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    """Cap on the fraction removed from one layer under global allocation."""
    round_to: Annotated[int, Field(ge=1)] = 1
    reduce: Literal["sum", "mean", "max"] = "sum"
    normalize: bool = True
    """Normalise group scores per layer before a global ranking."""
    compensate: Literal[False, True, "bias", "lstsq"] | None = None
    """None: the granularity's default (passes/prune_plan.py, chosen on held-out train data)."""
    n: Annotated[int | None, Field(ge=1)] = None
    m: Annotated[int | None, Field(ge=2)] = None

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.granularity == "n:m":
            if self.n is None or self.m is None:
                raise ValueError("granularity 'n:m' needs n and m (e.g. n: 2, m: 4)")
            if self.n >= self.m:
                raise ValueError(f"n ({self.n}) must be smaller than m ({self.m})")
        elif (self.amount is None) == (self.budget is None):
            raise ValueError("give exactly one of amount (a fraction) or budget (params or flops)")
        if self.importance == "obs":
            if self.granularity not in ("head", "neuron"):
                raise ValueError("importance 'obs' chooses heads or neurons by refitting the linear layer that reads "
                                 f"them; granularity {self.granularity!r} needs another importance (e.g. wanda)")
            if self.compensate not in (None, False, "lstsq"):
                raise ValueError("importance 'obs' refits by least squares; use compensate: lstsq (or leave it out)")
        return self


class QuantWeightsSpec(StrictModel):
    bits: Union[Literal[2, 3, 4, 8], list[Literal[2, 3, 4, 8]]] = 4
    average: Annotated[float | None, Field(ge=2.0, le=8.0)] = None
    """Target average bits over quantized weights (fractional allowed); needs a list of bits."""
    group_size: Annotated[int, Field(ge=-1)] = 128
    """Weights per scale along the input dimension; -1 for one scale per output channel."""
    symmetric: bool = False

    @model_validator(mode="after")
    def _check(self) -> "QuantWeightsSpec":
        if self.group_size == 0:
            raise ValueError("group_size must be positive, or -1 for per-channel")
        if self.average is not None:
            if not isinstance(self.bits, list) or len(self.bits) < 2:
                raise ValueError("average needs bits to be a list of at least two widths, e.g. [2, 4, 8]")
            if not min(self.bits) <= self.average <= max(self.bits):
                raise ValueError(f"average {self.average} is outside the allowed widths {self.bits}")
        return self


class ActivationQuantSpec(StrictModel):
    mode: Literal["static", "dynamic"] = "dynamic"
    bits: Literal[8] = 8
    smoothquant: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    """Migration strength alpha of SmoothQuant; None disables it."""


class GPTQSpec(StrictModel):
    """Options of `method: gptq`."""

    sequential: bool = False
    """Measure each layer's Hessian on the outputs of the already-quantized layers (the GPTQ paper's
    procedure); false (default): every Hessian from one run of the float model, each layer's fit checked
    against RTN on held-back batches. Sequential is opt-in (the LLM specs use it) until it has the same
    held-back check; on SmolLM2 W4 it measured a tie with one-shot RTN (41.36 vs 41.01 ppl)."""
    act_order: bool = False
    """Quantize columns in order of decreasing Hessian diagonal (groups stay contiguous in the original order)."""
    damp: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    """Added to the Hessian's diagonal, relative to its mean."""
    clip_search: bool = False
    """With act_order: shrink each group's range by weight MSE before the column sweep."""
    token_weight: Literal["uniform", "normalized", "clipped"] = "uniform"
    """How each calibration token counts in X^T X: uniform (plain GPTQ); normalized: every token by
    (median norm / its norm)^2, so GPTQ minimises relative output error per token (decoders' large
    tokens otherwise dominate the fit); clipped: only tokens above 4x the median norm are scaled down."""


class QuantizeSpec(StrictModel):
    """Weight-only group-wise quantization (mixed precision optional), embeddings, activations."""

    kind: Literal["quantize"] = "quantize"
    weights: QuantWeightsSpec | None = QuantWeightsSpec()
    method: Literal["rtn", "awq", "gptq"] = "rtn"
    gptq: GPTQSpec = GPTQSpec()
    allocate: Literal["uniform", "layerwise"] = "uniform"
    importance: LayerImportance = "outlier_fraction"
    order: Literal["importance", "random", "reverse"] = "importance"
    seed: int = 0
    scope: list[str] | None = None
    exclude: list[str] = []
    embeddings: Literal[None, 2, 3, 4, 8] = None
    embeddings_group_size: Annotated[int | None, Field(ge=-1)] = None
    """Group size of embedding tables along the embedding dim (-1: one group per row); None: weights.group_size."""
    activations: ActivationQuantSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "QuantizeSpec":
        if self.weights is None and self.embeddings is None and self.activations is None:
            raise ValueError("nothing to quantize: give weights, embeddings or activations")
        if self.allocate == "layerwise" and (self.weights is None or not isinstance(self.weights.bits, list)):
            raise ValueError("allocate 'layerwise' needs weights.bits to be a list, e.g. [2, 4, 8]")
        return self


class SkipSpec(StrictModel):
    """Remove whole blocks, or one residual branch of them, by importance."""

    kind: Literal["skip"] = "skip"
    layers: Union[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0.0, lt=1.0)], list[str]] = 1
    granularity: Literal["block", "attention", "mlp"] = "block"
    importance: LayerImportance = "fidelity_drop"
    search: Literal["oneshot", "greedy", "beam"] = "beam"
    """oneshot: rank once; greedy: remove one at a time, re-scoring; beam: greedy that keeps the
    `beam_width` best partial sets at each step (finds pairs greedy misses)."""
    beam_width: Annotated[int, Field(ge=1, le=64)] = 4
    protect: list[str] = []


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


class RotateSpec(StrictModel):
    """Rotate the residual stream by an orthogonal matrix fused into the weights (before quantize)."""

    kind: Literal["rotate"] = "rotate"
    matrix: Literal["hadamard", "random"] = "hadamard"
    """hadamard: randomised Hadamard (random signs; random orthogonal where no construction exists)."""
    seed: int = 0
    online: bool = False
    """Insert explicit matmuls by Q where the stream meets an op that does not commute with a
    rotation (e.g. Gemma's norms on residual branches) instead of refusing."""


PassSpec = Annotated[
    Union[CleanupSpec, PruneSpec, QuantizeSpec, SkipSpec, TokenSpec, RotateSpec],
    Field(discriminator="kind"),
]
PASS_KINDS = ("cleanup", "prune", "quantize", "skip", "token", "rotate")


class Spec(StrictModel):
    """A compression spec: passes applied in order, plus calibration, verify and export.

    Load one from a dict, YAML/JSON text or a file (`Spec.load`); a bad field raises one
    `SpecError` line naming the field and the fix.

    Example:
        >>> from rewrite.spec import Spec
        >>> spec = Spec.load({"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.25}]})
        >>> spec.passes[0].kind, spec.passes[0].amount, spec.calibration.samples > 0
        ('prune', 0.25, True)
        >>> Spec.load({"passes": [{"kind": "prune", "granularity": "neurons"}]})
        Traceback (most recent call last):
        ...
        rewrite.errors.SpecError: ...
    """

    calibration: CalibrationSpec = CalibrationSpec()
    passes: list[PassSpec] = [CleanupSpec()]
    verify: VerifySpec = VerifySpec()
    export: ExportSpec = ExportSpec()
    budget: BudgetSpec | None = None
    executor: Literal["local", "ray"] = "local"
    """Where plan-search measurements run (the budget allocator's cost table): "ray" spreads them over
    Ray workers (in-process Ray, or the cluster at RAY_ADDRESS; needs the `ray` extra)."""

    # -- loading ---------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any) -> "Spec":
        """Validate a dict (or a Spec) and raise a short SpecError on failure."""
        if isinstance(data, Spec):
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a mapping of settings (e.g. passes: [...]), got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(_explain(exc)) from None

    @classmethod
    def from_yaml(cls, source: str | Path) -> "Spec":
        """Load from a YAML file path or a YAML string."""
        text = _read_text(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise SpecError(f"{_source_name(source)} is not valid YAML{at}: {problem}") from None
        return cls.parse(data)

    @classmethod
    def from_json(cls, source: str | Path) -> "Spec":
        """Load from a JSON file path or a JSON string."""
        text = _read_text(source)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{_source_name(source)} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        return cls.parse(data)

    @classmethod
    def load(cls, source: "Spec | dict | str | Path | None") -> "Spec":
        """Accept a Spec, a dict, or a path to a YAML/JSON file."""
        if source is None or isinstance(source, (Spec, dict)):
            return cls.parse(source)
        path = Path(source)
        if not path.exists():
            raise SpecError(f"spec file not found: {path}")
        return cls.from_json(path) if path.suffix.lower() == ".json" else cls.from_yaml(path)

    def to_yaml(self) -> str:
        """The spec as YAML, every field included (what `rewrite compile` writes next to the model)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)

    def to_json(self) -> str:
        """The spec as JSON, every field included."""
        return self.model_dump_json(indent=2)


def _is_path(source: str | Path) -> bool:
    return isinstance(source, Path) or ("\n" not in str(source) and Path(str(source)).suffix in {".yaml", ".yml", ".json"})


def _source_name(source: str | Path) -> str:
    """`spec file specs/x.yaml` or `spec` (a YAML string): what the error message names."""
    return f"spec file {source}" if _is_path(source) else "spec"


def _read_text(source: str | Path) -> str:
    if _is_path(source):
        path = Path(source)
        if not path.exists():
            raise SpecError(f"spec file not found: {path}")
        return path.read_text(encoding="utf-8")
    return str(source)


def _explain(exc: ValidationError) -> str:
    """One line: per problem the field path, the bad value, and what is valid (problems joined by '; ').

    A value that fits no member of a union (`layers: two` against int | float | list) gives
    pydantic one error per member; they become one problem listing what each member accepts.
    """
    problems: dict[str, list[tuple[str, dict]]] = {}
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        # drop pydantic's union-member tags ("prune", "list[...]", "int") from the path
        path = ".".join(p for p in loc if not _is_union_tag(p)) or "spec"
        member = next((p for p in reversed(loc) if _is_union_tag(p) and p not in PASS_KINDS), "")
        problems.setdefault(path, []).append((member, err))
    lines = []
    seen: set[str] = set()
    for path, errs in problems.items():
        members = {m for m, _ in errs}
        if len(errs) > 1 and len(members) == len(errs) and all(e["type"] not in _STRUCTURAL for _, e in errs):
            line = f"{path}: {_union_message(errs)}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
            continue
        for _, err in errs:
            line = _one_problem(path, err)
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return "invalid spec: " + "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")


_STRUCTURAL = {"union_tag_invalid", "union_tag_not_found", "extra_forbidden", "missing"}
_MEMBER_NAMES = {"int": "an integer", "constrained-int": "an integer", "float": "a number", "constrained-float": "a number",
                 "str": "a string", "bool": "a boolean"}


def _union_message(errs: list[tuple[str, dict]]) -> str:
    """`should be an integer greater than or equal to 1, a number greater than 0 or a valid list (got 0)`."""
    options = []
    for member, err in errs:
        msg = err["msg"].replace("Value error, ", "")
        msg = msg[len("Input should be "):] if msg.startswith("Input should be ") else msg
        msg = msg.split(", unable to parse")[0].split(", got a number")[0]
        kind = err["type"]
        if not (kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith(("literal", "int_from"))):
            desc = _MEMBER_NAMES.get(member, "a list" if member.startswith("list[") else "")
            msg = f"{desc} {msg}".strip()
        if msg not in options:
            options.append(msg)
    listed = ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]
    value = errs[0][1].get("input")
    return f"should be {listed} (got {value!r})"


def _one_problem(path: str, err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    value = err.get("input")
    if kind == "union_tag_invalid":
        msg = f"unknown pass kind {value.get('kind')!r}; valid kinds: {', '.join(PASS_KINDS)}" if isinstance(value, dict) else err["msg"]
    elif kind == "union_tag_not_found":
        msg = f"missing 'kind'; valid kinds: {', '.join(PASS_KINDS)}"
    elif kind == "extra_forbidden":
        msg = f"unknown field {loc[-1]!r} (value {value!r}); remove it or check its spelling"
        path = ".".join(p for p in loc[:-1] if not _is_union_tag(p)) or "spec"
    elif kind == "missing":
        msg = "required field is missing"
    else:
        msg = f"{err['msg']} (got {value!r})" if not isinstance(value, dict) else err["msg"]
        msg = msg.replace("Value error, ", "")
    return f"{path}: {msg}"


def _is_union_tag(part: str) -> bool:
    return part in PASS_KINDS or part.startswith(("list[", "literal[", "function-", "union[")) or part in {
        "int", "float", "str", "bool", "constrained-int", "constrained-float"
    }
