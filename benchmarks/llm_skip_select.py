"""Which layers the deploy spec skips, selected on wiki-train only (never on wiki-dev).

1. The skip pass's own search (`fidelity_drop`: 1 - per-token logit cosine against the
   unskipped model; `--search oneshot` ranks once, `greedy` re-scores after each removal) picks
   up to `--max-layers` blocks, scored on `--chunks` chunks of 256 wiki-train tokens
   (`rewrite.llm_data.calibration_chunks`, the recipe's even spread); that is the removal order.
2. For k = 0..max, the first k blocks of that order are bypassed on the captured graph
   (`passes.skip_blocks.bypassed`, the mechanism the pass applies) and scored by perplexity
   on held-back wiki-train text: the last `--held-back` tokens of wiki-train (windows of 512,
   after every calibration chunk), the data README's window recipe otherwise.
3. Printed: the order, held-back train perplexity per k, and the share of the model's linear
   weight bytes each k removes (what decode speed, bound by reading weights, gains).

    OMP_NUM_THREADS=1 nice -n 19 python -m benchmarks.llm_skip_select --model smollm2 --max-layers 3 --search oneshot --chunks 8 --held-back 4096
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewrite  # noqa: E402
from rewrite.llm_data import calibration_chunks, logits_of, wiki_tokens, window_nll  # noqa: E402

def held_back_windows(tok, n_tokens: int, window: int = 512) -> torch.Tensor:
    """The last `n_tokens` of wiki-train: after every calibration chunk of the even spread."""
    ids = wiki_tokens(tok, "train")
    return ids[-n_tokens:].view(-1, window).clone()


def perplexity(program, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for w in windows.split(1):
        out = program.run({"input_ids": w, "attention_mask": torch.ones_like(w)})
        s, c = window_nll(logits_of(out), w)
        total, count = total + s, count + c
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--max-layers", type=int, default=4)
    ap.add_argument("--search", default="greedy", choices=["oneshot", "greedy", "beam"])
    ap.add_argument("--chunks", type=int, default=16, help="calibration chunks of 256 wiki-train tokens")
    ap.add_argument("--held-back", type=int, default=8192, help="held-back wiki-train tokens scored per k")
    ap.add_argument("--out", default="out/bench-llm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from rewrite.passes.skip_blocks import bypassed, find_regions
    from rewrite import models

    model, tok = getattr(models, f"load_{args.model}")()
    model.config.use_cache = False
    chunks = calibration_chunks(tok, n=args.chunks, length=256)
    calib = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks.split(2)]
    spec = {"calibration": {"samples": args.chunks, "batch_size": 2, "holdout": 0.125},
            "passes": [{"kind": "skip", "layers": args.max_layers, "search": args.search, "importance": "fidelity_drop"}]}
    out = rewrite.compile(model, spec, example_inputs=calib[0], calibration=calib, task=None)
    rec = out.report.passes[0]
    order = rec.details["removed"]
    print(f"{args.search} order (fidelity_drop on {args.chunks} x 256 wiki-train tokens): {order}", flush=True)
    for t in rec.details["trajectory"]:
        print(f"  {t}", flush=True)
    original = out.original
    regions = {r.key: r for r in find_regions(original, "block").regions}
    linear = {n: p.numel() for n, p in original.module.named_parameters() if p.dim() == 2}
    total = sum(linear.values())  # a tied table counts once: the LM head reads it all at every step
    windows = held_back_windows(tok, args.held_back)
    rows = []
    for k in range(args.max_layers + 1):
        skipped = order[:k]
        prog = bypassed(original, [regions[key] for key in skipped]) if k else original
        ppl = perplexity(prog, windows)
        share = sum(v for n, v in linear.items() if any(n.startswith(key + ".") for key in skipped)) / total
        rows.append({"k": k, "skipped": skipped, "held-back train ppl": ppl, "linear weights removed": share})
        print(f"k={k}: {skipped} held-back wiki-train ppl {ppl:.2f}, linear weights removed {share:.1%}", flush=True)
    path = Path(args.out) / args.model / "skip_select.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"order": order, "trajectory": rec.details["trajectory"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
