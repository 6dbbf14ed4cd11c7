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

# Field types shared by pass specs. (Importance kinds are registered next to their scoring
# functions, `passes.importance.kinds`; the pass specs build their Literal types from there.)
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
OpenFraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields are errors; attribute docstrings become the schema's descriptions."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


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


GENERATION_OPSET = 23
"""The opset a text-generation graph exports at when the spec does not set one: at 23 torch's exporter
lowers SDPA to the standard `Attention` op (and folds RMSNorm / rotary into `RMSNormalization` /
`RotaryEmbedding`), and `backends.onnx_fusions` hands it the KV cache (past/present, grouped heads)."""


class OnnxExportSpec(StrictModel):
    opset: Annotated[int, Field(ge=18, le=23)] = 21
    """Default 21; text-generation graphs default to `GENERATION_OPSET` (23) unless set here."""
    dynamic: bool = True
    """Keep batch and sequence dimensions dynamic in the exported model."""
    external_data: Literal["auto", True, False] = "auto"
    """Store weights next to the model file; 'auto' does so above 1 GiB of weights."""
    debug_metadata: bool = False
    """Keep torch's per-node metadata (stack traces, module scopes): about 2.5 KB per node, so
    off by default; turn on to trace an ONNX node back to the Python line that made it."""
    decode_tables_at_load_mb: Annotated[float, Field(ge=0.0)] = 256.0
    """A quantized embedding table whose float copy is at most this many MiB is decoded once, when
    onnxruntime loads the model (the file stays packed, memory holds floats, a lookup is a plain
    Gather: decoding the gathered rows on every call cost MiniLM ~7% of its throughput); a larger
    one stays packed in memory too and each call decodes only its rows. 0: always packed."""
    matmulnbits: bool = True
    """Lower 4- and 8-bit weight-only linears (block size a power of two >= 16) to onnxruntime's
    `com.microsoft::MatMulNBits`, which keeps the codes packed and runs its own low-bit kernels.
    Off: standard ONNX only (DequantizeLinear + MatMul, folded once at load), for runtimes without
    onnxruntime's contrib ops. Int8-activation per-group linears (`linear_qa8_group`) need
    MatMulNBits either way."""


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


# --------------------------------------------------------------------------- pass specs
# Each pass kind's spec class lives next to its pass (passes/<kind>.py) and is registered with
# the pass (`rewrite.pass_base.register`), so this core module imports no pass: the union of
# pass specs, the kind list and the JSON schema are built from this registry when first used.
PASS_SPECS: dict[str, type[StrictModel]] = {}
"""{kind: spec class}, in registration order (filled when the pass modules are imported)."""


def pass_kind(spec_class: type[BaseModel]) -> str:
    """The `kind` a pass spec class declares (its `kind: Literal["..."]` field's default)."""
    field = spec_class.model_fields.get("kind")
    if field is None or not isinstance(field.default, str) or not field.default:
        raise TypeError(f"{spec_class.__name__} needs a field kind: Literal['<kind>'] = '<kind>' (the spec's discriminator)")
    return field.default


def register_pass_spec(spec_class: type[StrictModel]) -> type[StrictModel]:
    """Add a pass spec class to the union that `Spec.passes` accepts (and to the schema)."""
    PASS_SPECS[pass_kind(spec_class)] = spec_class
    _rebuild()
    return spec_class


def unregister_pass_spec(kind: str) -> type[StrictModel] | None:
    """Remove a kind from the union (tests that register a throwaway pass clean up with this)."""
    cls = PASS_SPECS.pop(kind, None)
    _rebuild()
    return cls


def pass_kinds() -> tuple[str, ...]:
    """The registered pass kinds, in registration order (what error messages list as valid)."""
    return tuple(PASS_SPECS)


class PassSpec:
    """The type of one entry of `Spec.passes`: the union of the registered pass specs, told apart by `kind`.

    Its validator is built from `PASS_SPECS` when `Spec` is first used (and rebuilt when a kind is
    registered later), so a new pass kind needs no edit here.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        members = tuple(PASS_SPECS.values())
        if not members:
            raise TypeError("no pass kinds are registered; import rewrite.passes (rewrite.compiler does) before using Spec")
        union = members[0] if len(members) == 1 else Union[members]  # type: ignore[valid-type]
        return handler(Annotated[union, Field(discriminator="kind")])


def _default_passes() -> list[BaseModel]:
    """The default pipeline: one cleanup pass."""
    return [PASS_SPECS["cleanup"]()]


def _rebuild() -> None:
    """Rebuild `Spec`'s validator after the registry changed (only if it was already built)."""
    spec_class = globals().get("Spec")
    if spec_class is not None and spec_class.__pydantic_complete__:
        spec_class.model_rebuild(force=True)


def __getattr__(name: str) -> Any:
    """`PASS_KINDS` and the registered spec classes by name (`from rewrite.spec import PruneSpec`), so
    code written before the specs moved next to their passes keeps working."""
    if name == "PASS_KINDS":
        return pass_kinds()
    for cls in list(PASS_SPECS.values()):
        if cls.__name__ == name:
            return cls
        for field in cls.model_fields.values():  # nested option models (QuantWeightsSpec, GPTQSpec, ...)
            for t in (field.annotation, *get_args(field.annotation)):
                if isinstance(t, type) and t.__name__ == name and issubclass(t, BaseModel):
                    return t
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, defer_build=True)

    calibration: CalibrationSpec = CalibrationSpec()
    passes: list[PassSpec] = Field(default_factory=_default_passes)
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
        member = next((p for p in reversed(loc) if _is_union_tag(p) and p not in pass_kinds()), "")
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
        msg = f"unknown pass kind {value.get('kind')!r}; valid kinds: {', '.join(pass_kinds())}" if isinstance(value, dict) else err["msg"]
    elif kind == "union_tag_not_found":
        msg = f"missing 'kind'; valid kinds: {', '.join(pass_kinds())}"
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
    return part in PASS_SPECS or part.startswith(("list[", "literal[", "function-", "union[")) or part in {
        "int", "float", "str", "bool", "constrained-int", "constrained-float"
    }
