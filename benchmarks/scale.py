"""Models larger than memory: block-by-block W4 quantization of Llama-size checkpoints, peak RSS and wall time per phase.

The benchmark writes its own checkpoints: Llama-architecture configs of the sizes of
Llama-3.2-1B, Llama-3.2-3B and Llama-2-7B with random bf16 weights (N(0, 0.02), norms 1),
as sharded safetensors + index + config.json, streamed one block at a time from the meta
model (`rewrite.checkpoint.parameters_on_meta`), so writing a 7B checkpoint needs about one
block of memory too. Then `rewrite.sequential.quantize_sequential` runs in a fresh
subprocess per size (so the peak RSS is the pipeline's own, read from the kernel's VmHWM per
phase), and the table prints wall time and peak RSS per phase.

Calibration for `--method gptq`: sequences of `--seq-len` tokens from
`../shared/data/wiki/wiki-train.txt`, tokenized as UTF-8 bytes (ids < 256: the weights are
random, so any ids in the vocabulary exercise the same work; the Llama tokenizers are not
available offline).

After quantizing, the worker exports the written folder to ONNX in bounded memory
(`rewrite.sequential_export.export_checkpoint`: fake-weight capture, weights streamed into the
external-data file, packed weights as MatMulNBits) and checks the written file in onnxruntime
on `--tokens` tokens against the torch model run module by module on the same folder.

The table's last two columns: the peak of compress + export (quantize phases, capture and the
ONNX write) and the peak of the whole run, which adds the torch reference (module by module) and
the onnxruntime check of the written file (under `sequential_export.BOUNDED_SESSION_CONFIG`: the
external data memory-mapped, no prepacked copies, no constant folding, no arena). The issue's
targets bound the whole run.

`--depths 8,16,24` prints instead the compile time vs depth at the width of the first size:
capture, the recapture + canonicalize that follows every pass, and the ONNX translation, on
fake weights (shapes only), each depth in a fresh process (the Ray allocator run is
`benchmarks/ray_allocator.py`).

    python benchmarks/scale.py --sizes 1b                  # W4 g128 RTN on the 1B-size checkpoint
    python benchmarks/scale.py --sizes 1b --layers 4,8,16  # peak RSS vs depth at one block size
    python benchmarks/scale.py --sizes 1b,3b,7b --method gptq --calibration 16 --seq-len 512
    python benchmarks/scale.py --sizes 1b --depths 8,16,24 --threads 1   # compile time vs depth
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the repo root, not benchmarks/ (benchmarks/token.py would shadow the stdlib)

# Llama-3.2-1B, Llama-3.2-3B (tied 128k embeddings, GQA) and Llama-2-7B (untied 32k, MHA) shapes
SIZES: dict[str, dict] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=131072),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=131072),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False,
               rope_theta=10000.0, max_position_embeddings=4096),
}


def write_checkpoint(size: str, directory: Path, layers: int | None = None, seed: int = 0) -> dict:
    """A random-weight bf16 Llama checkpoint: one safetensors shard per block (+ one for the rest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewrite.checkpoint import parameters_on_meta
    from rewrite.sequential import find_blocks

    cfg = LlamaConfig(**{**SIZES[size], **({"num_hidden_layers": layers} if layers else {})}, dtype="bfloat16",
                      use_cache=False)
    with parameters_on_meta():
        model = LlamaForCausalLM(cfg)
    blocks_path, blocks = find_blocks(model)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=torch.bfloat16)
        out = torch.empty(shape, dtype=torch.bfloat16)
        step = max(1, (1 << 22) // shape[1])   # filled in row chunks: no float32 copy of a whole table
        for a in range(0, shape[0], step):
            out[a:a + step] = (torch.randn((min(step, shape[0] - a), *shape[1:]), generator=g) * 0.02).to(torch.bfloat16)
        return out

    names = [n for n, _ in model.named_parameters()]          # a tied lm_head appears once (as the embedding)
    shards: list[list[str]] = [[n for n in names if n.startswith(f"{blocks_path}.{i}.")] for i in range(len(blocks))]
    shards.append([n for n in names if not n.startswith(blocks_path + ".")])
    params = dict(model.named_parameters())
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: tensor(n, tuple(params[n].shape)) for n in shard}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in shard})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                          "weight_map": weight_map}))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(directory)
    return {"params": sum(params[n].numel() for n in names), "bytes": total}


def calibration(n: int, seq_len: int) -> list[dict]:
    import torch

    from rewrite.llm_data import wiki_dir

    text = (wiki_dir() / "wiki-train.txt").read_bytes()
    ids = torch.tensor(list(text[: n * seq_len]), dtype=torch.int64)
    if ids.numel() < n * seq_len:
        raise SystemExit(f"wiki-train.txt has fewer than {n * seq_len} bytes")
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0),
             "attention_mask": torch.ones(1, seq_len, dtype=torch.int64)} for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    """One pipeline run in this (fresh) process: quantize block by block, then the streamed ONNX
    export of the written folder and its onnxruntime check; prints its result as one JSON line."""
    import torch

    from rewrite.sequential_export import export_checkpoint
    from rewrite.sequential import quantize_sequential

    torch.set_num_threads(args.threads)
    spec = {"method": args.method, "weights": {"bits": args.bits, "group_size": args.group_size},
            "gptq": {"sequential": True}}
    cal = calibration(args.calibration, args.seq_len) if args.method == "gptq" else None
    start = time.perf_counter()
    res = quantize_sequential(args.worker[0], spec, args.worker[1], calibration=cal, progress=True)
    out_bytes = sum(f.stat().st_size for f in Path(args.worker[1]).glob("*.safetensors"))
    quantize_s = time.perf_counter() - start
    onnx = {}
    if not args.no_onnx:
        exp = export_checkpoint(args.worker[1], Path(args.worker[1]) / "onnx" / "model.onnx", progress=True,
                                tokens=args.tokens)
        onnx = {"bytes": exp.bytes, "verified": exp.verified, "rel_error": exp.rel_error, "cosine": exp.cosine,
                "phases": [p.__dict__ for p in exp.phases]}
    print(json.dumps({"wall_s": time.perf_counter() - start, "quantize_s": quantize_s, "peak_rss_mb": res.peak_rss_mb,
                      "out_bytes": out_bytes, "phases": [p.__dict__ for p in res.phases], "onnx": onnx}))


def depth_worker(args: argparse.Namespace) -> None:
    """Compile-time steps of the 1B-width model at one depth, on fake weights (shapes only, no bytes):
    the first capture, the recapture every pass is followed by (`Program.recapture` + canonicalize,
    as `passmanager.run_passes` does), and the ONNX translation of the captured program (the
    streamed export's capture). Prints one JSON line: seconds and peak RSS per step, node counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewrite.checkpoint import parameters_on_meta
    from rewrite.inputs import Inputs
    from rewrite.passes.canonicalize import canonicalize
    from rewrite.program import Program
    from rewrite.sequential import MemoryMeter
    from rewrite.sequential_export import fake_weights

    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(**{**SIZES[args.size], "num_hidden_layers": args.depth_worker}, use_cache=False)
    meter = MemoryMeter()
    with meter.phase("build (meta)"):
        with parameters_on_meta():
            model = LlamaForCausalLM(cfg).eval()
        fake_weights(model)
    ids = (torch.arange(args.tokens) * 7919 + 1).remainder(cfg.vocab_size).unsqueeze(0)
    example = Inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with meter.phase("capture"):
        program = Program.capture(model, example)
    nodes = len(program.graph.nodes)
    for i in range(args.recaptures):
        with meter.phase(f"recapture {i + 1}"):
            program = program.recapture()
            canonicalize(program)
    with meter.phase("ONNX translation"):
        import logging

        from rewrite.backends.onnx import _quiet
        from rewrite.capture import export_program
        from rewrite.kernels import registry

        registry.load_all()
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with torch.no_grad():
            ep = export_program(model, example, True)
        with _quiet():
            onnx_program = torch.onnx.export(ep, dynamo=True, opset_version=21, verbose=False, optimize=False,
                                             custom_translation_table=registry.onnx_translations() or None)
        onnx_nodes = len(onnx_program.model.graph)
    print(json.dumps({"depth": args.depth_worker, "fx_nodes": nodes, "onnx_nodes": onnx_nodes,
                      "phases": [p.__dict__ for p in meter.phases]}))


def depth_table(args: argparse.Namespace) -> None:
    """Compile time vs depth at the 1B width: each depth in a fresh process; the table and the
    per-layer cost of a recapture (linear growth keeps seconds per layer flat)."""
    rows = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        cmd = [sys.executable, __file__, "--depth-worker", str(depth), "--size", args.size, "--threads",
               str(args.threads), "--tokens", str(args.tokens), "--recaptures", str(args.recaptures)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"depth {depth}: the capture failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nCompile time vs depth, {args.size} width (fake weights: shapes only), {args.threads} thread(s); "
          "each cell: wall s / peak RSS MB of the step\n")
    print("| layers | FX nodes | capture | recapture + canonicalize (mean of "
          f"{args.recaptures}) | recapture s per layer | ONNX translation | ONNX nodes |")
    print("|---:|---:|---|---|---:|---|---:|")
    for r in rows:
        ph = {p["name"]: p for p in r["phases"]}
        rec = [p for p in r["phases"] if p["name"].startswith("recapture")]
        mean = sum(p["seconds"] for p in rec) / max(len(rec), 1)
        peak = max((p["peak_rss_mb"] for p in rec), default=0)
        cap, ox = ph["capture"], ph["ONNX translation"]
        print(f"| {r['depth']} | {r['fx_nodes']} | {cap['seconds']:.1f}s / {cap['peak_rss_mb']:.0f} | "
              f"{mean:.1f}s / {peak:.0f} | {mean / r['depth']:.3f} | {ox['seconds']:.1f}s / {ox['peak_rss_mb']:.0f} | "
              f"{r['onnx_nodes']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b", help="comma list of 1b, 3b, 7b")
    ap.add_argument("--layers", default="", help="comma list of depths to run instead of the size's own")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=16, help="sequences (gptq)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp") + "/rewrite-scale")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (reused when present)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens of the onnxruntime check")
    ap.add_argument("--no-onnx", action="store_true", help="skip the streamed ONNX export and its check")
    ap.add_argument("--depths", default="", help="comma list of depths: the compile-time-vs-depth table "
                    "(fake weights) at the width of the first --sizes entry, instead of the pipeline runs")
    ap.add_argument("--recaptures", type=int, default=2, help="recaptures timed per depth (--depths)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--depth-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--size", default="1b", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.depth_worker:
        return depth_worker(args)
    if args.depths:
        args.size = args.sizes.split(",")[0]
        return depth_table(args)
    import shutil

    rows = []
    depths = [int(d) for d in args.layers.split(",") if d] or [None]
    for size in args.sizes.split(","):
        for depth in depths:
            tag = f"{size}" + (f"-{depth}l" if depth else "")
            ckpt, out = Path(args.dir) / tag, Path(args.dir) / f"{tag}-w{args.bits}-{args.method}"
            start = time.perf_counter()
            if not (ckpt / "config.json").is_file():
                info = write_checkpoint(size, ckpt, depth)
                print(f"{tag}: wrote {info['params'] / 1e9:.2f}B params, {info['bytes'] / 1e9:.2f} GB bf16 "
                      f"in {time.perf_counter() - start:.0f}s", file=sys.stderr)
            cmd = [sys.executable, __file__, "--worker", str(ckpt), str(out), "--method", args.method,
                   "--bits", str(args.bits), "--group-size", str(args.group_size), "--threads", str(args.threads),
                   "--calibration", str(args.calibration), "--seq-len", str(args.seq_len),
                   "--tokens", str(args.tokens)] + (["--no-onnx"] if args.no_onnx else [])
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode:
                raise SystemExit(f"{tag}: the pipeline failed (exit {proc.returncode})")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            rows.append((tag, ckpt_bytes, res))
            shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    print(f"\nW{args.bits} g{args.group_size} {args.method}, bf16 random-weight checkpoints, {args.threads} threads; "
          "each cell: wall s / peak RSS MB of the phase (the kernel's VmHWM, reset per phase)\n")
    print("| model | checkpoint GB | output GB | ONNX GB | load | catch | blocks (max peak) | outside blocks | "
          "capture | write ONNX | torch ref | ORT verify (rel err) | peak compress+export MB | peak whole run MB |")
    print("|---|---:|---:|---:|---|---|---|---|---|---|---|---|---:|---:|")
    for tag, ckpt_bytes, res in rows:
        ph = {p["name"]: p for p in res["phases"]}
        ox = res.get("onnx") or {}
        oph = {p["name"]: p for p in ox.get("phases", [])}
        blocks = [p for p in res["phases"] if p["name"].startswith("block ")]

        def cell(p: dict | None) -> str:
            return f"{p['seconds']:.0f}s / {p['peak_rss_mb']:.0f}" if p else "-"

        bl = f"{sum(p['seconds'] for p in blocks):.0f}s / {max(p['peak_rss_mb'] for p in blocks):.0f}" if blocks else "-"
        verify = cell(oph.get("onnxruntime verify"))
        if ox.get("verified"):
            verify += f" ({ox['rel_error']:.1e})"
        compress_export = max([p["peak_rss_mb"] for p in res["phases"]] +
                              [p["peak_rss_mb"] for n, p in oph.items() if n in ("capture (fake weights)", "write ONNX (streamed)")])
        print(f"| {tag} | {ckpt_bytes / 1e9:.2f} | {res['out_bytes'] / 1e9:.2f} | "
              f"{(ox.get('bytes') or 0) / 1e9:.2f} | {cell(ph.get('load'))} | {cell(ph.get('catch block inputs'))} | {bl} | "
              f"{cell(ph.get('outside the blocks'))} | {cell(oph.get('capture (fake weights)'))} | "
              f"{cell(oph.get('write ONNX (streamed)'))} | {cell(oph.get('torch reference (streamed)'))} | {verify} | "
              f"{compress_export:.0f} | {max([compress_export] + [p['peak_rss_mb'] for p in oph.values()]):.0f} |")

if __name__ == "__main__":
    main()
