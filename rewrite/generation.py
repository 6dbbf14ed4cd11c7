"""Generation graphs: capture a causal LM around its KV cache, with no per-architecture code.

HF cache objects (`DynamicCache` and its layers) cannot cross a torch.export boundary, so
the cache is flattened at the graph boundary instead: `CacheGraph.forward` takes the past
keys and values as plain tensors, builds the model's own cache object from them inside the
graph, calls the model with `use_cache=True`, and returns the logits plus the updated
keys and values as plain tensors. The model's code runs unchanged, so every HF decoder
that accepts a `DynamicCache` works the same way.

Why each choice:
- Every layer gets a *full* (non-sliding) cache layer whose length is the tensor's own size
  (`FlatLayer`): sliding-window and hybrid models then see every past position, and their
  own sliding-window masks (built from the config) do the windowing, so results equal the
  model's. HF's `get_seq_length` tests `numel() == 0`, a guard on a dynamic size that export
  would specialise; the flat layer reads the length from the shape instead.
- One graph serves prefill (past length 0) and decode: it is captured with a past of length
  >= 2 and new-token length >= 2 (export specialises sizes 0 and 1), with the past length
  declared as a named dimension of range [0, inf), and run at past 0 as well.
- The model's child modules are registered directly on the wrapper, so module paths (and
  the spec's selectors) are the same as for the model captured on its own.

Interface (the names onnxruntime-genai and optimum use, see `input_names`/`output_names`):
inputs `input_ids`, `attention_mask` (batch x total length), `position_ids` (when the model
takes them), `past_key_values` (a list of (key, value) per layer, [batch, kv heads, past, head
dim]); outputs `logits` and `present.{i}.key` / `present.{i}.value`.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.export import Dim

from .errors import CaptureError, PassError
from .inputs import Inputs

TASK = "text-generation"
NOTES_KEY = "generation"


# ----------------------------------------------------------------------- task detection
def detect_task(model: nn.Module) -> str | None:
    """'text-generation' for HF causal LMs (a generate() method and a causal-LM head), else None.

    A model counts as a causal LM when its config's model type is registered as one in
    transformers' causal-LM auto mapping, its class name says so (`*ForCausalLM`), or its
    config declares it a decoder; plain encoders and `*Model` backbones stay full-sequence.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        return None
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) or getattr(config, "is_decoder", False):
        return TASK
    return None


def resolve_task(model: nn.Module, task: str | None) -> str | None:
    """The task to capture for: 'auto' detects, None keeps the full-sequence graph."""
    if task == "auto":
        return detect_task(model)
    if task in (None, TASK):
        return task
    raise PassError(f"unknown task {task!r}: use 'text-generation', 'auto' or None (full-sequence graph)")


# ----------------------------------------------------------------------- the cache wrapper
def _flat_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class FlatLayer(DynamicLayer):
        """A full dynamic cache layer whose length is the size of its tensors (no numel guard)."""

        def get_seq_length(self) -> int:
            return self.keys.shape[-2] if self.is_initialized else 0

    return FlatLayer


def _cache_from(past: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    layer_cls = _flat_layer_class()
    cache = DynamicCache()
    layers = []
    for key, value in past:
        layer = layer_cls()
        layer.update(key, value)
        layers.append(layer)
    cache.layers = layers
    return cache


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v, *_ in cache]  # legacy tuple-of-tuples


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def accepts_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


class CacheGraph(nn.Module):
    """`model` with its KV cache as flat tensors at the boundary (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a child: its children are ours instead
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.config = model.config
        self._cache_kw = _cache_kwarg(model)
        self.training = model.training  # capture restores this mode afterwards: keep the model's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True,
                                  self._cache_kw: _cache_from(past_key_values or [])}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self._model(**kwargs)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        flat = {"logits": out.logits}
        for i, (k, v) in enumerate(_cache_layers(cache)):
            flat[f"present.{i}.key"] = k
            flat[f"present.{i}.value"] = v
        return flat


# ----------------------------------------------------------------------- layout and inputs
@dataclass
class CacheLayout:
    """What a generation graph's interface looks like: one (key, value) shape per layer."""

    layers: list[tuple[tuple[int, int], tuple[int, int]]]
    """Per layer: ((key heads, key head dim), (value heads, value head dim))."""
    position_ids: bool
    max_positions: int | None = None
    vocab_size: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "float32"
    layer_map: list[int] | None = None
    """The model's layer index of each cache entry, when layers were skipped (None: entry i is
    layer i). The interface numbers the entries 0..n-1 (what onnxruntime-genai expects); the
    torch module keeps the model's numbers in its output keys (`present_keys`), so outputs of
    the original and the rewritten graph pair up by name."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def source_layers(self) -> list[int]:
        """The model's layer index of each cache entry."""
        return list(self.layer_map) if self.layer_map is not None else list(range(self.num_layers))

    def present_keys(self) -> list[tuple[str, str]]:
        """The torch module's output keys of each cache entry: the model's layer numbers."""
        return [(f"present.{i}.key", f"present.{i}.value") for i in self.source_layers()]

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
        for i in range(self.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def empty_past(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dt = getattr(torch, self.dtype)
        return [(torch.zeros(batch, kh, 0, kd, dtype=dt), torch.zeros(batch, vh, 0, vd, dtype=dt))
                for (kh, kd), (vh, vd) in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [list(map(list, l)) for l in self.layers], "position_ids": self.position_ids,
                "max_positions": self.max_positions, "vocab_size": self.vocab_size,
                "eos_token_ids": self.eos_token_ids, "dtype": self.dtype,
                **({"layer_map": list(self.layer_map)} if self.layer_map is not None else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheLayout":
        layers = [(tuple(k), tuple(v)) for k, v in d["layers"]]
        return cls(layers=layers, position_ids=d["position_ids"], max_positions=d.get("max_positions"),
                   vocab_size=d.get("vocab_size"), eos_token_ids=list(d.get("eos_token_ids") or []),
                   dtype=d.get("dtype", "float32"),
                   layer_map=list(d["layer_map"]) if d.get("layer_map") is not None else None)


def positions_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position ids of the last `new_tokens` tokens: count of real tokens before each (pads -> 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, attention_mask.shape[1] - new_tokens:].contiguous()


def step_inputs(layout: CacheLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Inputs:
    """One call's inputs: new tokens, the mask over past + new, positions, and the past."""
    if past is None:
        past = layout.empty_past(input_ids.shape[0])
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if layout.position_ids:
        kwargs["position_ids"] = positions_from_mask(attention_mask, input_ids.shape[1])
    kwargs["past_key_values"] = [tuple(kv) for kv in past]
    return Inputs((), kwargs)


def _token_batch(batch: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) from a user batch of token inputs."""
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise CaptureError("a text-generation model needs input_ids (batch x tokens) as example/calibration inputs; "
                           "give a dict with input_ids (and attention_mask)")
    mask = batch.kwargs.get("attention_mask", batch.args[1] if len(batch.args) > 1 else None)
    if mask is None:
        mask = torch.ones_like(ids)
    return ids, mask.to(ids.dtype)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def layout_for(model: nn.Module, example: Inputs) -> CacheLayout:
    """Run the model once with a cache to read each layer's key/value shapes."""
    ids, mask = _token_batch(example)
    wrapper = CacheGraph(model)
    probe = step_inputs(CacheLayout([], accepts_position_ids(model)), ids[:, :2], mask[:, :2], [])
    with torch.no_grad(), _eval(model):
        out = probe.call(wrapper)
    n = sum(1 for k in out if k.endswith(".key"))
    layers = [((int(out[f"present.{i}.key"].shape[1]), int(out[f"present.{i}.key"].shape[3])),
               (int(out[f"present.{i}.value"].shape[1]), int(out[f"present.{i}.value"].shape[3]))) for i in range(n)]
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    dtype = str(out["logits"].dtype).replace("torch.", "")
    return CacheLayout(layers, accepts_position_ids(model), max_pos, getattr(text, "vocab_size", None), eos_ids, dtype)


def capture_example(model: nn.Module, layout: CacheLayout, example: Inputs) -> Inputs:
    """A decode-shaped example: a real past (from a prefill of the first tokens) plus new tokens.

    Past and new lengths are both >= 2, and batch >= 2, all different, so export keeps them
    dynamic and separate.
    """
    ids, mask = _token_batch(example)
    while ids.shape[1] < 5:
        ids, mask = torch.cat([ids, ids], 1), torch.cat([mask, mask], 1)
    n_past = ids.shape[1] // 2
    if 2 * n_past == ids.shape[1]:  # equal example sizes would be unified into one symbol by export
        n_past -= 1
    while ids.shape[0] < 2 or ids.shape[0] in (n_past, ids.shape[1] - n_past):
        ids, mask = torch.cat([ids, ids[:1]], 0), torch.cat([mask, mask[:1]], 0)
    wrapper = CacheGraph(model)
    with torch.no_grad(), _eval(model):
        pre = step_inputs(layout, ids[:, :n_past], mask[:, :n_past], None).call(wrapper)
    # contiguous copies: a view's strides would be captured as guards on the sizes
    past = [(pre[f"present.{i}.key"].contiguous(), pre[f"present.{i}.value"].contiguous())
            for i in range(layout.num_layers)]
    return step_inputs(layout, ids[:, n_past:].contiguous(), mask.contiguous(), past)


def prefill_batches(layout: CacheLayout, data: Iterable[Any] | None) -> Iterator[Inputs] | None:
    """Calibration batches of token inputs as prefill calls of the generation graph (past 0)."""
    if data is None:
        return None

    def gen() -> Iterator[Inputs]:
        for raw in data:
            ids, mask = _token_batch(Inputs.of(raw))
            yield step_inputs(layout, ids, mask, None)

    return gen()


@dataclass(frozen=True)
class GenerationShapes:
    """The dynamic-shape policy of a generation graph (truthy: capture is dynamic).

    `rewrite.capture` asks it for torch.export's `dynamic_shapes`: batch and new-token length
    shared by the token inputs, past length (min 0) shared by every cache tensor, and the
    mask's total length left to export (it equals past + new).
    """

    num_layers: int
    position_ids: bool
    check_guards: bool = False
    """Export traces with every dynamic size >= 2 and so records `mask length >= 4` (past >= 2
    plus new >= 2) as a guard, although the graph is size-generic; prefill with fewer than 4
    tokens would trip it. No guard function, and `relax` lowers the ranges the remaining input
    check uses. The graph is checked at past 0 and 1-token steps instead (tests, and the
    generation check on export)."""

    def __bool__(self) -> bool:
        return True

    def relax(self, module: torch.nn.Module) -> None:
        """Lower every input range of the unlifted module to 0, keeping the equality checks.

        torch.export traces with every dynamic size >= 2 (it specialises 0 and 1), so the
        ranges it records are artefacts of the capture example, not of the graph: the mask's
        total length comes out as `>= 4` (past >= 2 plus new >= 2), and the module's input
        check (a forward pre-hook, active even without guards) would refuse a 3-token prompt.
        The graph computes the same thing at any past >= 0 and new >= 1 (checked at past 0
        with 1- and 2-token prompts in the tests and by the generation check on export);
        the checks that sizes agree across inputs (batch, past length) stay.
        """
        from torch.utils._sympy.value_ranges import ValueRanges

        ranges = getattr(module, "range_constraints", None)
        if isinstance(ranges, dict):
            module.range_constraints = {sym: ValueRanges(0, r.upper) for sym, r in ranges.items()}

    def dynamic_shapes(self, inputs: Inputs) -> dict[str, Any]:
        batch = Dim("batch_size")
        seq = Dim("sequence_length")
        past = Dim("past_sequence_length", min=0)
        shapes: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO}}
        if "position_ids" in inputs.kwargs:
            shapes["position_ids"] = {0: batch, 1: seq}
        shapes["past_key_values"] = [({0: batch, 2: past}, {0: batch, 2: past})
                                     for _ in inputs.kwargs.get("past_key_values", [])]
        return shapes


# ----------------------------------------------------------------------- pass compatibility
def check_passes(passes: list[Any]) -> None:
    """Refuse rewrites that cannot be carried into the KV cache, before any work (token pruning).

    Skipped layers drop their cache entries (`cache_entries.drop_cache_entries`) and pruned heads
    narrow them (`cache_entries.narrow_cache_heads`)."""
    for p in passes:
        kind = getattr(p, "kind", "")
        if kind == "token":
            raise PassError("token pruning cannot run on a text-generation graph: the KV cache must keep every prompt "
                            "token for decoding. Compile with task=None for a full-sequence (prefill-only) graph, or "
                            "drop the token pass")


@dataclass
class GenerationProgramInfo:
    """Stored in `Program.notes['generation']`: the interface of a generation graph."""

    layout: CacheLayout

    @staticmethod
    def of(program: Any) -> CacheLayout | None:
        d = program.notes.get(NOTES_KEY)
        return CacheLayout.from_dict(d) if d else None
