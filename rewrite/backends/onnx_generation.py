"""ONNX export of a generation graph: optimum / onnxruntime-genai names, KV cache verified.

The graph is lowered by the general ONNX backend (`backends.onnx.to_onnx_proto`, with the
program's KV-cache shape policy), then its interface is renamed to the names
onnxruntime-genai and optimum use (`input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key/.value` -> `logits`, `present.{i}.key/.value`) with symbolic dims
`batch_size`, `sequence_length`, `past_sequence_length`, `total_sequence_length`. The cache
layout is stored in the file's metadata, so `rewrite.generate` can drive the file alone.

Verification (on by default): prefill logits of held-back prompts and a decode step match
the torch module within the backend tolerance, and greedy generation of `new_tokens`
tokens with the cache in onnxruntime gives exactly the torch module's tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rewrite.backends.onnx_fusions import apply_onnx_rules
from rewrite.backends.onnx import session, staged_onnx_file, strip_debug_metadata, to_onnx_proto
from rewrite.compare import compare
from rewrite.decode_loop import GenerationError, Past, TorchStepper, check_step, generate_ids
from rewrite.errors import ExportError, VerificationError
from rewrite.generation import NOTES_KEY, CacheLayout, GenerationProgramInfo, positions_from_mask
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.report import ExportRecord

METADATA_KEY = "rewrite.generation"


def rename_interface(proto: Any, layout: CacheLayout) -> None:
    """Rename graph inputs/outputs to the genai/optimum names and set their symbolic dims."""
    graph = proto.graph
    ins, outs = layout.input_names(), layout.output_names()
    if len(graph.input) != len(ins) or len(graph.output) != len(outs):
        raise ExportError(f"the exported generation graph has {len(graph.input)} inputs and {len(graph.output)} outputs, "
                          f"expected {len(ins)} and {len(outs)} ({ins[:3]}..., {outs[:3]}...)")
    mapping = {v.name: new for v, new in zip(graph.input, ins)}
    mapping.update({v.name: new for v, new in zip(graph.output, outs)})
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
    dims = {"input_ids": ("batch_size", "sequence_length"), "attention_mask": ("batch_size", "total_sequence_length"),
            "position_ids": ("batch_size", "sequence_length"), "logits": ("batch_size", "sequence_length", None)}
    for vi in list(graph.input) + list(graph.output):
        names = dims.get(vi.name)
        if names is None and vi.name.startswith("past_key_values."):
            names = ("batch_size", None, "past_sequence_length", None)
        if names is None and vi.name.startswith("present."):
            names = ("batch_size", None, "total_sequence_length", None)
        for dim, sym in zip(vi.type.tensor_type.shape.dim, names or ()):
            if sym is not None:
                dim.dim_param = sym
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(layout.to_dict())


class OrtStepper:
    """An exported generation graph in onnxruntime as a `rewrite.decode_loop.Stepper`."""

    def __init__(self, path: str | Path, layout: CacheLayout | None = None, **session_options: Any):
        path = Path(path)
        if not path.exists():
            raise GenerationError(f"no ONNX file at {path}: export one with `rewrite compile` (a text-generation model)")
        self.session = session(path, **session_options)
        if layout is None:
            meta = self.session.get_modelmeta().custom_metadata_map
            if METADATA_KEY not in meta:
                raise GenerationError(f"{path} is not a generation graph exported by rewrite (no KV-cache metadata): "
                                      "compile the model with task='text-generation' and export again")
            layout = CacheLayout.from_dict(json.loads(meta[METADATA_KEY]))
        self.layout = layout
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Past) -> tuple[torch.Tensor, Past]:
        check_step(self.layout, input_ids, attention_mask, past)
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = positions_from_mask(attention_mask, input_ids.shape[1]).numpy()
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k.detach().numpy()
            feeds[f"past_key_values.{i}.value"] = v.detach().numpy()
        outs = self.session.run(None, feeds)
        tensors = [torch.from_numpy(o) for o in outs]
        present = [(tensors[1 + 2 * i], tensors[2 + 2 * i]) for i in range(self.layout.num_layers)]
        return tensors[0], present


def verify_steps(program: Program, model_path: Path, batches: Sequence[Inputs], *, rtol: float = 1e-4,
                 quantile: float = 1.0) -> tuple[float, float, float, str]:
    """Logits and presents of onnxruntime vs the torch module, at real (unpadded) positions.

    Left-padded prompts make the pad positions' queries attend to nothing; what a backend
    computes there is arbitrary and never read (later tokens mask those keys out), so those
    positions are left out. Error: like `backends.onnx.verify_onnx` (the `quantile` of the
    absolute errors relative to the largest magnitude; the record keeps the largest).
    """
    layout = GenerationProgramInfo.of(program)
    torch_step, ort_step = TorchStepper(program.module, layout), OrtStepper(model_path, layout)

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batch by batch, so `compare` holds one batch's outputs (logits: positions x vocabulary)."""
        for batch in batches:
            batch = program.fit_inputs(batch)  # calibration prompts carry the captured cache entries
            ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
            past = [tuple(kv) for kv in batch.kwargs["past_key_values"]]
            want, want_present = torch_step(ids, mask, past)
            got, got_present = ort_step(ids, mask, past)
            real = mask.bool()
            rows = real[:, -ids.shape[1]:]
            want, got = want[rows], got[rows]
            yield want, got
            del want, got
            for (wk, wv), (gk, gv) in zip(want_present, got_present):
                for w, g in ((wk, gk), (wv, gv)):
                    if w.shape != g.shape:
                        raise VerificationError(f"onnxruntime present shape {tuple(g.shape)} != torch {tuple(w.shape)}")
                    yield w.transpose(1, 2)[real], g.transpose(1, 2)[real]

    agreement = compare(pairs(), rtol=rtol, quantile=quantile).check("onnxruntime", consequence="; the ONNX file was not written")
    worst_abs, worst_rel, cos_min = agreement.max_abs, agreement.max_rel, agreement.cosine
    return worst_abs, worst_rel, cos_min, ort_step.session.get_providers()[0]


def prompts_for_check(batches: Sequence[Inputs], max_rows: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-back prompts (input_ids, attention_mask) from the prefill batches, a few rows each."""
    out, rows = [], 0
    for b in batches:
        ids, mask = b.kwargs["input_ids"], b.kwargs["attention_mask"]
        take = min(ids.shape[0], max_rows - rows)
        if take <= 0:
            break
        out.append((ids[:take], mask[:take]))
        rows += take
    return out


def check_generation(program: Program, model_path: Path, prompts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     new_tokens: int, tie_tolerance: float = 0.0) -> tuple[int, list[str]]:
    """Greedy tokens with the cache in onnxruntime == the torch module's.

    Returns (tokens compared, notes). `tie_tolerance` (relative to the largest logit) is
    only non-zero for graphs with int8 activations: there one activation can round to the
    neighbouring integer in onnxruntime, so where torch's two best tokens are closer than
    that, the backends may pick different ones. Such a step ends that prompt's comparison
    (the sequences differ afterwards) and is reported; any other difference fails.
    """
    layout = GenerationProgramInfo.of(program)
    torch_step, ort_step = TorchStepper(program.module, layout), OrtStepper(model_path, layout)
    compared, notes = 0, []
    for ids, mask in prompts:
        n = new_tokens
        if layout.max_positions:
            n = max(1, min(n, layout.max_positions - ids.shape[1]))
        want, _ = generate_ids(torch_step, ids, mask, max_new_tokens=n, eos_token_ids=[])
        got, _ = generate_ids(ort_step, ids, mask, max_new_tokens=n, eos_token_ids=[])
        for row in range(want.shape[0]):
            diff = (want[row] != got[row]).nonzero()
            if not len(diff):
                compared += n
                continue
            col = int(diff[0])
            gap, scale = _torch_gap(torch_step, ids[row:row + 1], mask[row:row + 1], want[row, :col],
                                    int(want[row, col]), int(got[row, col]))
            if gap > tie_tolerance * scale:
                raise VerificationError(
                    f"greedy generation with the KV cache differs between onnxruntime and the torch module: prompt row "
                    f"{row}, new token {col}: onnxruntime {int(got[row, col])} vs torch {int(want[row, col])} (torch logit "
                    f"gap {gap:.3g} of {scale:.3g}); the ONNX file was not written")
            compared += col
            notes.append(f"a near-tie at new token {col} (torch logit gap {gap:.2g}, {gap / scale:.1e} of the largest "
                         f"logit) picked a different token; equal before it")
    return compared, notes


def _torch_gap(step: TorchStepper, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, want: int,
               got: int) -> tuple[float, float]:
    """torch's logit of its own token minus the other backend's token, after the shared prefix."""
    full = torch.cat([ids, prefix[None]], 1)
    full_mask = torch.cat([mask, torch.ones_like(prefix)[None]], 1)
    logits, _ = step(full, full_mask, step.layout.empty_past(1))
    last = logits[0, -1]
    return float(last[want] - last[got]), float(last.abs().max())


def export_generation(program: Program, path: Path, *, opset: int = 21, external_data: Any = "auto",
                      debug_metadata: bool = False, verify: bool = True, prompts: Sequence[Inputs] = (),
                      new_tokens: int = 32, rtol: float = 1e-4, quantile: float = 1.0,
                      tokenizer: Any = None, options: Any = None) -> ExportRecord:
    """Write `path` (atomic: nothing is left on a failed export or check)."""
    layout = GenerationProgramInfo.of(program)
    if layout is None:
        raise ExportError(f"the program has no '{NOTES_KEY}' interface: it is not a generation graph")
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = to_onnx_proto(program, opset=opset, dynamic=program.dynamic, options=options)
    if not debug_metadata:
        strip_debug_metadata(proto)
    rename_interface(proto, layout)
    fusions = apply_onnx_rules(proto)
    with staged_onnx_file(proto, path, program, external_data) as tmp_model:
        tmpdir = tmp_model.parent
        record = ExportRecord(backend="onnx", path=str(path), bytes=sum(f.stat().st_size for f in tmpdir.iterdir()),
                              seconds=0.0, verified=False)
        record.notes.append(f"text-generation graph: inputs {', '.join(layout.input_names()[:2 + layout.position_ids])}, "
                            f"past_key_values.{{0..{layout.num_layers - 1}}}.key/.value; outputs logits, "
                            f"present.{{0..{layout.num_layers - 1}}}.key/.value")
        record.notes.append(fusion_note(fusions))
        if layout.layer_map is not None:
            record.notes.append("skipped layers have no cache entry: entry i is model layer "
                                + ", ".join(f"{i}<-{src}" for i, src in enumerate(layout.layer_map))
                                + " (the map is also in the file's metadata, key 'layer_map')")
        if verify:
            batches = list(prompts) or [program.example]
            checks = [b for b in batches] + [program.example]  # prefills (past 0) and a decode step (past > 0)
            err = verify_steps(program, tmp_model, checks, rtol=rtol, quantile=quantile)
            record.max_abs_error, record.rel_error, record.cosine, record.provider = err
            token_prompts = prompts_for_check([b for b in batches if _is_prefill(b)] or [_as_prefill(program.example)])
            n, ties = check_generation(program, tmp_model, token_prompts, new_tokens,
                                       tie_tolerance=rtol if quantile < 1.0 else 0.0)
            record.verified = True
            rows = sum(p[0].shape[0] for p in token_prompts)
            if ties:
                record.notes.append(f"generation verified: greedy decoding of {new_tokens} new tokens with the KV cache from "
                                    f"{rows} held-back prompts gives the torch module's tokens ({n} tokens compared) except "
                                    f"after int8-rounding near-ties: " + "; ".join(ties))
            else:
                record.notes.append(f"generation verified: greedy decoding of {new_tokens} new tokens with the KV cache from "
                                    f"{rows} held-back prompts gives the torch module's tokens exactly ({n} tokens); "
                                    "prefill and decode-step logits within the tolerance")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmpdir))
    record.seconds = time.perf_counter() - start
    return record


def fusion_note(outcome: Any) -> str:
    """One line for the record: which KV-cache fusions applied, and why the others refused."""
    counts = outcome.counts()
    done = ", ".join(f"{rule} x{n}" for rule, n in counts.items()) or "none applied"
    refused = "; ".join(outcome.reasons())
    return f"ONNX fusions: {done}" + (f"; refused: {refused}" if refused else "")


def _is_prefill(batch: Inputs) -> bool:
    past = batch.kwargs.get("past_key_values") or []
    return not past or past[0][0].shape[2] == 0


def _as_prefill(batch: Inputs) -> Inputs:
    ids = batch.kwargs["input_ids"]
    return Inputs((), {"input_ids": ids, "attention_mask": batch.kwargs["attention_mask"][:, -ids.shape[1]:]})
