"""Decoder LLMs with the KV cache in onnxruntime (CPU): rewrite's fp32 / W4 / W4A8 / deploy exports and peers.

Rows (each an ONNX generation graph with the same interface, driven by the same stepper):
- `fp32`, `W4 g128`, `W4 g128 + E4`, `W4A8 g128 per-tensor`, `W4A8 g128 group + E4`, `deploy` (specs/llm-deploy.yaml): the real model
  (`rewrite.models`, offline GGUF weights) compiled as a text-generation graph and exported
  by rewrite at opset 23 (the generation default: `Attention` with the KV cache, RMSNormalization,
  RotaryEmbedding, merged sibling MatMulNBits; `backends.onnx_fusions`), each verified on export
  (32 greedy tokens with the cache in onnxruntime equal the torch module's);
- peer `HF OnnxExporter fp32`: the fp32 model exported by transformers' own ONNX exporter
  (`transformers.exporters.exporter_onnx.OnnxExporter`, transformers 5; torch.onnx.export with
  dynamo inside, HF's DynamicCache registered as a pytree) with the cache, dynamic shapes; no
  rewrite code and no post-processing (its interface names `input.cache.layers.{i}.keys` ->
  `output.cache.layers.{i}.keys`, no position_ids input, are mapped by the benchmark's stepper).
  Plain `torch.onnx.export(model, kwargs={..., "cache": DynamicCache}, dynamic_shapes=...,
  dynamo=True)` fails: "Cannot associate shape ... specified at dynamic_shapes['cache'] to
  non-tensor type DynamicCache" (the cache is not a pytree node without transformers' exporter);
- peer `ORT int4`: onnxruntime's `MatMulNBitsQuantizer` (4 bits, block 128, asymmetric) applied
  to the fp32 file (the peer's when it is there). Ratios are against the peer fp32 file.

Three stages, each cached on disk under `--out/<model>/<row>/`, so the expensive ones run once:
1. `export`: compile + export every row (skipped when the file is there; `--reexport`).
2. `ppl`: wiki-dev perplexity of every ONNX file in onnxruntime (1 thread), the recipe of
   `../shared/data/wiki/README.md` (`rewrite.llm_data`: first 32768 tokens, 512-token windows
   scored on their own), cached in `ppl.json` per row. Run it in the background, outside the lock.
3. `time`: prefill latency (batch 1 x 512 tokens) and decode tokens/s (batch 1, 128 new tokens
   after a 128-token prompt, greedy, with the cache), rows interleaved round after round, medians;
   run under the shared timing lock (`--lock`), and print the table.

    python -m benchmarks.llm --model smollm2 --stage export
    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.llm --model smollm2 --stage ppl &
    python -m benchmarks.llm --model smollm2 --stage time --lock /work/wt/_notes/timing.lock
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewrite  # noqa: E402
from benchmarks.timing_lock import timing_lock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OURS: dict[str, Any] = {
    "fp32": {"passes": []},
    "W4 g128": {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": 128}}]},
    "W4 g128 + E4": {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": 128}, "embeddings": 4}]},
    "W4A8 g128 per-tensor": {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": 128, "symmetric": True},
                                         "activations": {"mode": "dynamic"}}]},
    "W4A8 g128 group + E4": {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": 128},
                                         "activations": {"mode": "dynamic", "granularity": "group"}, "embeddings": 4}]},
    "deploy": str(REPO / "specs" / "llm-deploy.yaml"),
}
"""`W4A8 ... per-tensor`: one uint8 range per call (DynamicQuantizeLinear + MatMulInteger on a folded int8
weight); `W4A8 ... group`: int8 activations per token and K-group, MatMulNBits int8 compute on the packed
codes (`activations.granularity: group`); `W4 g128 + E4`: weight-only, float activations (MatMulNBits float
compute, so onnxruntime and torch agree to float rounding, no int8 near-ties); `+ E4`: the token-embedding table stored at 4 bits as well (the
tied LM head is quantized as a linear; a float table alone is a fifth of SmolLM2's fp32 file)."""
PEER_FP32 = "peer: HF OnnxExporter fp32"
PEER_INT4 = "peer: ORT MatMulNBitsQuantizer int4 g128"
ROWS = list(OURS) + [PEER_FP32, PEER_INT4]


def row_dir(out: Path, row: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in row).strip("_")
    return out / safe


def file_bytes(path: Path) -> int:
    """The .onnx file plus its external data."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def load(name: str) -> tuple[Any, Any]:
    from rewrite import models

    return getattr(models, f"load_{name}")()


# ----------------------------------------------------------------------- export
def export_ours(model: Any, tok: Any, spec: Any, path: Path) -> dict:
    example = dict(tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True))
    from rewrite.llm_data import calibration_batches

    # wiki-train (never dev): 16 chunks of 256 tokens, the recipe's even spread; the skip pass of
    # the deploy spec ranks blocks on it, the export check generates from its held-back batch
    calib = calibration_batches(tok, n=16, length=256, batch_size=2)
    compiled = rewrite.compile(model, spec, example_inputs=example, calibration=calib)
    rec = compiled.export(path, tokenizer=tok)
    note = next((n for n in rec.notes if "generation verified" in n), "")
    fusions = next((n for n in rec.notes if n.startswith("ONNX fusions")), "")
    return {"verified": bool(rec.verified), "note": note, "fusions": fusions}


def export_peer_fp32(model: Any, tok: Any, path: Path) -> dict:
    """transformers' own ONNX exporter with the model's DynamicCache (a public route, no rewrite code)."""
    from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

    enc = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        pre = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    cache = getattr(pre, "cache", None) or pre.past_key_values
    sample = {"input_ids": ids[:, 3:], "attention_mask": mask, "cache": cache, "use_cache": True}
    exported = OnnxExporter().export(model, sample, config=OnnxConfig(dynamic=True, opset_version=21))
    path.parent.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(str(path.parent))
    write_peer_layout(model, cache, path.parent / "layout.json")
    return {"verified": False, "note": "transformers.exporters OnnxExporter (torch.onnx.export dynamo), DynamicCache"}


def write_peer_layout(model: Any, cache: Any, path: Path) -> None:
    """The peer file's cache layout, its names, and the cache's constant leaves: a sliding-window
    layer (Gemma-3's local layers) is flattened with a scalar `_sliding_window_tensor` beside its
    keys and values, a graph input that the stepper feeds back unchanged."""
    from rewrite.generation import CacheLayout

    layers = [((int(l.keys.shape[1]), int(l.keys.shape[3])), (int(l.values.shape[1]), int(l.values.shape[3])))
              for l in cache.layers]
    constants = {HF_NAMES["past"].format(i=i, kv="_sliding_window_tensor"): int(l._sliding_window_tensor)
                 for i, l in enumerate(cache.layers) if hasattr(l, "_sliding_window_tensor")}
    layout = CacheLayout(layers, position_ids=False, max_positions=None, vocab_size=int(model.config.get_text_config().vocab_size))
    path.write_text(json.dumps({**layout.to_dict(), "io_names": {**HF_NAMES, "constants": constants}}))


HF_NAMES = {"past": "input.cache.layers.{i}.{kv}", "present": "output.cache.layers.{i}.{kv}", "kv": ["keys", "values"]}
"""The interface transformers' exporter writes (the file's names for the cache tensors)."""


def export_peer_int4(fp32: Path, path: Path) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=128, is_symmetric=False)
    q.process()
    path.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(path), use_external_data_format=True)
    layout = fp32.parent / "layout.json"
    if layout.exists():  # rewrite's own files carry the layout in their metadata
        (path.parent / "layout.json").write_text(layout.read_text())
    return {"verified": False, "note": "onnxruntime MatMulNBitsQuantizer"}


def stage_export(model_name: str, out: Path, rows: list[str], reexport: bool) -> None:
    torch.set_num_threads(1)
    model, tok = load(model_name)
    for row in rows:
        path = row_dir(out, row) / "model.onnx"
        info = row_dir(out, row) / "export.json"
        if path.exists() and info.exists() and not reexport:
            continue
        start = time.perf_counter()
        if row in OURS:
            r = export_ours(model, tok, OURS[row], path)
        elif row == PEER_FP32:
            r = export_peer_fp32(model, tok, path)
        else:  # on the peer fp32 file, or on rewrite's fp32 export when the peer row is not there
            src = next(row_dir(out, r) / "model.onnx" for r in (PEER_FP32, "fp32")
                       if (row_dir(out, r) / "model.onnx").exists())
            r = export_peer_int4(src, path)
            r["source"] = str(src)
        r["seconds"] = time.perf_counter() - start
        info.write_text(json.dumps(r))
        print(f"  {row}: {file_bytes(path) / 1e6:.1f} MB, verified={r['verified']}, {r['seconds']:.0f}s",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- running a file
def stepper(path: Path, threads: int = 0) -> Any:
    from rewrite.backends.onnx_generation import OrtStepper
    from rewrite.generation import CacheLayout

    layout_file = path.parent / "layout.json"
    d = json.loads(layout_file.read_text()) if layout_file.exists() else None
    layout = CacheLayout.from_dict(d) if d else None
    if d and d.get("io_names"):
        return NamedOrtStepper(path, layout, d["io_names"], threads=threads or None)
    return OrtStepper(path, layout, threads=threads or None)


class NamedOrtStepper:
    """A generation file whose interface has other names for the cache tensors (the HF peer)."""

    def __init__(self, path: Path, layout: Any, names: dict, **options: Any):
        from rewrite.backends.onnx import session

        self.session, self.layout, self.names = session(path, **options), layout, names
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        from rewrite.generation import positions_from_mask

        feeds = {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()}
        feeds.update({k: np.asarray(v, np.int64) for k, v in self.names.get("constants", {}).items() if k in self.inputs})
        if "position_ids" in self.inputs:
            feeds["position_ids"] = positions_from_mask(attention_mask, input_ids.shape[1]).numpy()
        k_name, v_name = self.names["kv"]
        for i, (k, v) in enumerate(past):
            feeds[self.names["past"].format(i=i, kv=k_name)] = k.detach().numpy()
            feeds[self.names["past"].format(i=i, kv=v_name)] = v.detach().numpy()
        outs = dict(zip(self.outputs, self.session.run(None, feeds)))
        present = [(torch.from_numpy(outs[self.names["present"].format(i=i, kv=k_name)]),
                    torch.from_numpy(outs[self.names["present"].format(i=i, kv=v_name)]))
                   for i in range(self.layout.num_layers)]
        return torch.from_numpy(outs["logits"]), present


def stage_ppl(model_name: str, out: Path, rows: list[str], n_tokens: int) -> dict[str, float]:
    from rewrite.llm_data import perplexity

    torch.set_num_threads(1)
    _, tok = load(model_name)
    result = {}
    for row in rows:
        path = row_dir(out, row) / "model.onnx"
        cache = row_dir(out, row) / "ppl.json"
        key = {"bytes": file_bytes(path), "n_tokens": n_tokens}
        if cache.exists() and json.loads(cache.read_text()).get("key") == key:
            result[row] = json.loads(cache.read_text())["ppl"]
            continue
        step = stepper(path, threads=1)
        start = time.perf_counter()

        def forward(ids: torch.Tensor) -> torch.Tensor:
            logits, _ = step(ids, torch.ones_like(ids), step.layout.empty_past(ids.shape[0]))
            return logits

        ppl = perplexity(None, tok, n_tokens=n_tokens, forward=forward)
        cache.write_text(json.dumps({"key": key, "ppl": ppl, "seconds": time.perf_counter() - start}))
        result[row] = ppl
        print(f"  {row}: wiki-dev ppl {ppl:.2f} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return result


# ----------------------------------------------------------------------- timing
def prompt_ids(tok: Any, n: int) -> torch.Tensor:
    """The first n tokens of wiki-train (held apart from the dev text perplexity is measured on)."""
    from rewrite.llm_data import wiki_tokens

    return wiki_tokens(tok, "train")[None, :n].clone()


def timers(step: Any, prefill_ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int) -> tuple[Callable, Callable]:
    layout = step.layout

    def prefill() -> float:
        start = time.perf_counter()
        step(prefill_ids, torch.ones_like(prefill_ids), layout.empty_past(1))
        return time.perf_counter() - start

    def decode() -> float:
        mask = torch.ones_like(prompt)
        logits, past = step(prompt, mask, layout.empty_past(1))
        start = time.perf_counter()
        token = logits[:, -1].argmax(-1)
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits, past = step(token[:, None], mask, past)
            token = logits[:, -1].argmax(-1)
        return new_tokens / (time.perf_counter() - start)

    return prefill, decode


def same_tokens(a: Any, b: Any, prompt: torch.Tensor, n: int) -> bool:
    from rewrite.decoding import generate_ids

    x, _ = generate_ids(a, prompt, max_new_tokens=n, eos_token_ids=[])
    y, _ = generate_ids(b, prompt, max_new_tokens=n, eos_token_ids=[])
    return bool(torch.equal(x, y))


def stage_time(model_name: str, out: Path, rows: list[str], args: argparse.Namespace) -> None:
    _, tok = load(model_name)
    prefill_ids, prompt = prompt_ids(tok, args.prefill), prompt_ids(tok, args.prompt)
    rows = [r for r in rows if (row_dir(out, r) / "model.onnx").exists()]
    info = {r: json.loads((row_dir(out, r) / "export.json").read_text()) for r in rows}
    ppl = {}
    for r in rows:
        f = row_dir(out, r) / "ppl.json"
        key = {"bytes": file_bytes(row_dir(out, r) / "model.onnx"), "n_tokens": args.ppl_tokens}
        if f.exists() and json.loads(f.read_text())["key"] == key:  # a re-exported file's old perplexity is stale
            ppl[r] = json.loads(f.read_text())["ppl"]
    steps = {r: stepper(row_dir(out, r) / "model.onnx") for r in rows}
    fns = {r: timers(s, prefill_ids, prompt, args.new_tokens) for r, s in steps.items()}
    samples: dict[str, dict[str, list[float]]] = {r: {"prefill": [], "decode": []} for r in rows}
    with timing_lock(args.lock):
        for r, (prefill, decode) in fns.items():  # warm-up (session init, first-call allocations)
            prefill()
        for _ in range(args.rounds):  # interleaved: every row once per round
            for r, (prefill, decode) in fns.items():
                samples[r]["prefill"].append(prefill())
                samples[r]["decode"].append(decode())
    peer_tokens = {}
    if PEER_FP32 in steps and "fp32" in steps:  # the peer file computes the same model: same tokens?
        peer_tokens[PEER_FP32] = same_tokens(steps[PEER_FP32], steps["fp32"], prompt[:, :16], 32)
    ref_fp32 = PEER_FP32 if PEER_FP32 in steps else "fp32"
    if PEER_INT4 in steps and ref_fp32 in steps:
        peer_tokens[PEER_INT4] = same_tokens(steps[PEER_INT4], steps[ref_fp32], prompt[:, :16], 32)
    base = PEER_FP32 if PEER_FP32 in rows else rows[0]
    b_dec = statistics.median(samples[base]["decode"])
    b_pre = statistics.median(samples[base]["prefill"])
    b_size = file_bytes(row_dir(out, base) / "model.onnx")
    print(f"\n{model_name}: onnxruntime {__import__('onnxruntime').__version__} CPU (2 cores, shared machine), "
          f"prefill 1x{args.prefill}, decode {args.new_tokens} new tokens after {args.prompt} (greedy, KV cache), "
          f"median of {args.rounds} interleaved rounds; ratios vs `{base}`; perplexity: wiki-dev, first "
          f"{args.ppl_tokens} tokens, 512-token windows, computed on the ONNX file in onnxruntime\n")
    ours = "fp32" if "fp32" in rows and base != "fp32" else None
    o_dec = statistics.median(samples[ours]["decode"]) if ours else None
    extra = " decode vs rewrite fp32 |" if ours else ""
    print(f"| row | file MB | size vs fp32 | prefill ms | prefill speed-up | decode tok/s | decode speed-up |{extra} wiki-dev ppl | tokens |")
    print("|---|---|---|---|---|---|---|" + ("---|" if ours else "") + "---|---|")
    for r in rows:
        size = file_bytes(row_dir(out, r) / "model.onnx")
        pre = statistics.median(samples[r]["prefill"])
        dec = statistics.median(samples[r]["decode"])
        if info[r]["verified"]:
            tokens = ("verified on export: greedy tokens = torch module up to an int8-rounding near-tie"
                      if "near-tie" in info[r].get("note", "") else "verified on export: 32 greedy tokens = torch module")
        elif r in peer_tokens:
            ref = "rewrite fp32" if r == PEER_FP32 else ref_fp32
            tokens = f"32 greedy tokens {'=' if peer_tokens[r] else '!='} {ref}"
        else:
            tokens = "-"
        p = f"{ppl[r]:.2f}" if r in ppl else "(not run)"
        vs_ours = f" {dec / o_dec:.2f}x |" if ours else ""
        print(f"| {r} | {size / 1e6:.1f} | {size / b_size:.0%} | {pre * 1e3:.0f} | {b_pre / pre:.2f}x | {dec:.1f} | "
              f"{dec / b_dec:.2f}x |{vs_ours} {p} | {tokens} |")
    spread = {r: (min(s["decode"]), max(s["decode"])) for r, s in samples.items()}
    print("\ndecode tok/s min..max per row: " + ", ".join(f"{r} {a:.1f}..{b:.1f}" for r, (a, b) in spread.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--stage", default="all", choices=["export", "ppl", "time", "all"])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--reexport", action="store_true")
    ap.add_argument("--lock", default=None, help="a file to flock around the timing (the machine's shared timing lock)")
    ap.add_argument("--out", default="out/bench-llm")
    args = ap.parse_args()
    out = Path(args.out) / args.model
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {ROWS}")
    if args.stage in ("export", "all"):
        stage_export(args.model, out, rows, args.reexport)
    if args.stage in ("ppl", "all"):
        stage_ppl(args.model, out, rows, args.ppl_tokens)
    if args.stage in ("time", "all"):
        stage_time(args.model, out, rows, args)


if __name__ == "__main__":
    main()
