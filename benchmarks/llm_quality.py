"""Weight quantization of real decoder LLMs: wiki-dev perplexity, size, time, with peers in the same run.

Models: SmolLM2-135M-Instruct and Gemma-3-270m (`rewrite.models`). Data and metric exactly as
`../shared/data/wiki/README.md` says: calibration = 128 chunks of 512 `wiki-train.txt` tokens
(chunk i * n_chunks // 128), perplexity = first N = 32768 `wiki-dev.txt` tokens in
non-overlapping 512-token windows (`--tokens` to use fewer; the table says which N).

Rows (every decoder-block linear quantized; lm_head and embeddings left in float):
- fp32;
- RTN (fake-quant in torch, asymmetric min/max per group): the simplest peer;
- GPTQ one-shot: `passes.quantize_methods.gptq` with every Hessian from one float run (what the
  quantize pass did before the fix);
- GPTQ sequential and with act-order; GPTQ with normalized token weights (`gptq_norm_*`, one-shot;
  `gptq_seq_norm_*`, sequential): each token counts by (median/|x|)^2 in X^T X;
- `spec:PATH` rows: the compiler itself (`rewrite.compile` of the captured full-sequence graph,
  task=None) with that spec, e.g. `spec:specs/llm-w4.yaml`; scored on the compiled torch graph AND
  on its ONNX export in onnxruntime (`--onnx-tokens`: the first that many dev tokens, shown beside
  the torch graph's perplexity on the same tokens; the two must agree); size = the compiled
  program's parameter bytes (packed weights, scales, zeros, the float rest); time = the whole compile;
- llm-compressor's `GPTQModifier` (symmetric int, group 128, `lm_head` ignored) run in its own
  venv (`--llmc-python`, default /work/venvs/llmc/bin/python) on the same calibration chunks and
  scored on the same windows by `benchmarks/llmc_gptq.py`; "not available" with the reason when
  it cannot run.
Size: bytes of the quantized linears (packed weights, fp32 scales, u8 zeros) + the float rest.

The "ours" rows apply the compiler's quantizers (`passes.quantize_methods`) to the torch module
block by block (`benchmarks/llm_sim.py`): it is the quantize pass's arithmetic without capture
and export, which on 2 shared cores would cost more than the whole table.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/llm_quality.py --model smollm2 --threads 1 \
        --rows fp32,rtn_w4,spec:specs/llm-w4.yaml,llmc_gptq_w4,rtn_w3,spec:specs/llm-w3.yaml,llmc_gptq_w3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rewrite import llm_data, models  # noqa: E402

import llm_sim  # noqa: E402

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def _rows() -> dict[str, dict]:
    rows: dict[str, dict] = {"fp32": {}}
    for b in (4, 3):
        rows[f"rtn_w{b}"] = {"method": "rtn", "bits": b}
        rows[f"gptq_oneshot_w{b}"] = {"method": "gptq", "bits": b, "sequential": False}
        rows[f"gptq_w{b}"] = {"method": "gptq", "bits": b, "sequential": True}
        rows[f"gptq_actorder_w{b}"] = {"method": "gptq", "bits": b, "sequential": True, "act_order": True}
        rows[f"gptq_norm_w{b}"] = {"method": "gptq", "bits": b, "sequential": False, "token_weight": "normalized"}
        rows[f"gptq_seq_norm_w{b}"] = {"method": "gptq", "bits": b, "sequential": True, "token_weight": "normalized"}
        rows[f"llmc_gptq_w{b}"] = {"peer": "llmc", "bits": b}
    for g in (32, 64):
        rows[f"rtn_w4_g{g}"] = {"method": "rtn", "bits": 4, "g": g}
        rows[f"gptq_w4_g{g}"] = {"method": "gptq", "bits": 4, "g": g, "sequential": True}
    return rows


def model_bytes(model: torch.nn.Module, bits: int | None, g: int) -> int:
    """Bytes with the decoder-block linears at `bits` (packed + fp32 scale + u8 zero per group), the rest fp32."""
    seen: set[int] = set()
    total = 0
    quantized = {id(m.weight) for layer in llm_sim.decoder_layers(model) for m in layer.modules()
                 if isinstance(m, torch.nn.Linear)} if bits else set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized:
            n, k = p.shape
            gg = llm_sim.effective_group(k, g)
            total += n * math.ceil(k * bits / 8) + n * (k // gg) * 5
        else:
            total += p.numel() * 4
    return total


def run_llmc(python: str, model_dir: Path, calib: torch.Tensor, windows: torch.Tensor, bits: int, g: int,
             threads: int) -> dict:
    if not Path(python).exists():
        return {"error": f"no llm-compressor venv at {python} (python -m venv /work/venvs/llmc && "
                         "pip install torch==2.13.0 llmcompressor)"}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data.pt", Path(tmp) / "out.json"
        torch.save({"calibration": calib, "windows": windows}, data)
        script = Path(__file__).resolve().parent / "llmc_gptq.py"
        proc = subprocess.run([python, str(script), str(model_dir), str(data), str(bits), str(g), str(out), str(threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"llm-compressor failed: {tail[0][:200]}"}
        return json.loads(out.read_text())


def compile_row(model: torch.nn.Module, spec_path: str, calib: torch.Tensor) -> tuple[object, float, int]:
    """(compiled, compile seconds, bytes) of the compiler on `model` with a spec file."""
    from rewrite.compiler import compile as rcompile
    from rewrite.program import Program
    from rewrite.spec import Spec

    spec = Spec.from_yaml(spec_path)
    bs = spec.calibration.batch_size
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(bs)]
    example = {"input_ids": calib[:1, :64], "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    t0 = time.time()
    model.config.use_cache = False  # the full-sequence graph: a DynamicCache output cannot be captured
    program = Program.capture(model, example)
    compiled = rcompile(program, spec, example_inputs=example, calibration=batches, task=None, progress=False)
    secs = time.time() - t0
    params = compiled.program.params()
    total = sum(v.numel() * v.element_size() for v in params.values())
    return compiled, secs, total


def onnx_forward(compiled: object, example: dict, threads: int, tmp: Path):
    """Export the compiled full-sequence graph (verified in onnxruntime on `example`) and return a
    logits function running the ONNX file, so the table's perplexity is measured on the exported model too."""
    import onnxruntime as ort

    path = tmp / "model.onnx"
    rec = compiled.export(path, verify_inputs=[example], progress=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def fwd(ids: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
        return torch.from_numpy(sess.run(None, {k: v for k, v in feeds.items() if k in names})[0])
    return fwd, rec


def window_nlls(forward, windows: torch.Tensor, batch_size: int = 4) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) per batch of windows, the recipe's arithmetic (`llm_data.window_nll`),
    so the perplexity of any prefix of the windows comes out of one run."""
    out = []
    with torch.inference_mode():
        for b in windows.split(batch_size):
            out.append(llm_data.window_nll(forward(b), b))
    return out


def ppl_of(parts: list[tuple[float, int]]) -> float:
    return math.exp(sum(s for s, _ in parts) / sum(c for _, c in parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--rows", default="fp32,rtn_w4,spec:specs/llm-w4.yaml,llmc_gptq_w4,"
                                      "rtn_w3,spec:specs/llm-w3.yaml,llmc_gptq_w3")
    ap.add_argument("--tokens", type=int, default=llm_data.PPL_TOKENS)
    ap.add_argument("--calib", type=int, default=llm_data.CALIB_CHUNKS, help="calibration chunks of 512 tokens")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--json", help="append each row as a JSON line here")
    ap.add_argument("--onnx-tokens", type=int, default=llm_data.PPL_TOKENS,
                    help="export each spec row to ONNX and measure the perplexity of the first this many dev tokens "
                         "in onnxruntime, beside the torch graph's on the same tokens (0: no ONNX)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    all_rows = _rows()
    name = MODELS[args.model]
    model, tok = models.load(name)
    calib = llm_data.calibration_chunks(tok, n=args.calib)
    windows = llm_data.ppl_windows(tok, args.tokens)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_ppl = None
    print(f"# {type(model).__name__} ({name}), wiki-dev N={args.tokens}, calibration {args.calib}x512 wiki-train, "
          f"group {args.group}, lm_head/embeddings float", flush=True)
    print("| row | ppl (torch) | ppl (ONNX, onnxruntime) | vs fp32 | size MB | quantize/compile s |\n"
          "|---|---|---|---|---|---|", flush=True)
    for row in args.rows.split(","):
        cfg = dict(all_rows.get(row, {}))
        g = cfg.pop("g", args.group)
        t0 = time.time()
        onnx_ppl = None
        if row.startswith("spec:"):
            model.load_state_dict(base)
            compiled, secs, size = compile_row(model, row[5:], calib)

            def fwd(ids: torch.Tensor, program=compiled.program) -> torch.Tensor:
                return llm_data.logits_of(program(input_ids=ids, attention_mask=torch.ones_like(ids)))
            parts = window_nlls(fwd, windows)
            ppl = ppl_of(parts)
            if args.onnx_tokens:
                n_on = args.onnx_tokens // 512 // 4
                with tempfile.TemporaryDirectory() as tmp:
                    ofwd, _ = onnx_forward(compiled, {"input_ids": windows[:1], "attention_mask": torch.ones_like(windows[:1])},
                                           args.threads, Path(tmp))
                    onnx_ppl = (ppl_of(window_nlls(ofwd, windows[:n_on * 4])), ppl_of(parts[:n_on]))
            del compiled
        elif cfg.get("peer") == "llmc":
            # llm-compressor refuses a group size that does not divide K (SmolLM2: K = 576, g = 128);
            # it gets the finest group our pass uses on any layer, for every layer (never coarser than ours)
            ks = {m.in_features for layer in llm_sim.decoder_layers(model) for m in layer.modules()
                  if isinstance(m, torch.nn.Linear)}
            g = min(llm_sim.effective_group(k, g) for k in ks)
            res = run_llmc(args.llmc_python, models.converted_path(name), calib, windows, cfg["bits"], g, args.threads)
            if "error" in res:
                print(f"| {row} | not available: {res['error']} | | | | |", flush=True)
                continue
            ppl, secs, size = res["ppl"], res["seconds"], model_bytes(model, cfg["bits"], g)
            row = f"{row} (g{g})"
        else:
            model.load_state_dict(base)
            if cfg:
                llm_sim.quantize_decoder(model, g=g, calibration=list(calib.split(4)), **cfg)
            secs = time.time() - t0
            ppl = llm_data.perplexity(model, tok, n_tokens=args.tokens, batch_size=4)
            size = model_bytes(model, cfg.get("bits"), g)
        if row == "fp32":
            fp32_ppl = ppl
        rel = f"{100 * (ppl / fp32_ppl - 1):+.1f}%" if fp32_ppl else ""
        if onnx_ppl is None:
            ox = "-"
        elif args.onnx_tokens >= args.tokens:
            ox = f"{onnx_ppl[0]:.3f}"
        else:
            ox = f"{onnx_ppl[0]:.3f} (torch {onnx_ppl[1]:.3f}, first {args.onnx_tokens} tokens)"
        print(f"| {row} | {ppl:.3f} | {ox} | {rel} | {size / 1e6:.1f} | {secs:.0f} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"model": name, "row": row, "ppl": ppl, "onnx_ppl": onnx_ppl, "size": size, "seconds": secs,
                                    "tokens": args.tokens, "calib": args.calib}) + "\n")


if __name__ == "__main__":
    main()
