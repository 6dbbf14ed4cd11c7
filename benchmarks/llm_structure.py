"""Structure of real decoder LLMs: block removal vs ShortGPT, pruning with vs without compensation,
layer-wise mixed precision ordered by importance vs random vs reverse, on wiki-dev perplexity.

Protocol (issue 16): every choice is made on wiki-train text, dev is scored once per row.
- calibration: `--calib` chunks of 512 `wiki-train.txt` tokens with the data README's spacing
  (chunk i * n_chunks // calib); statistics (block influence, pruning scores, refits) come from it;
- held-back: the last `--heldback` tokens of wiki-train (never in any calibration chunk), in
  512-token windows: the searches (greedy block removal, per-block quantization sensitivity) are
  scored on it;
- dev: the first `--tokens` tokens of `wiki-dev.txt`, 512-token windows, the README's recipe.

Parts (`--parts`, each prints one table; every row of a table measured in the same run):
- `remove`: remove `--blocks` blocks. Peer: ShortGPT, the blocks with the lowest block influence
  (1 - cos(block input, block output), averaged over calibration tokens), removed at once. Ours:
  ShortGPT's blocks each replaced by a linear stand-in x + x M + b fitted to the block's output
  (the compiler's skip pass with `compensate: linear` on the full-sequence graph; its rows say the
  ridge it chose and whether each map beat plain removal on its held-back batches), and greedy
  removal by held-back NLL (`llm_blocks.greedy_removal`); with `--stand-in-search`, a greedy that
  scores each candidate with its fitted stand-in (`llm_blocks.stand_in_greedy`), whose set then goes
  through the skip pass. Target: ours >= 15% lower ppl.
- `prune`: `--prune` of the attention heads (GQA-aware: a KV head goes with its query heads,
  allocated globally) and of the FFN neurons, chosen by wanda, through the compiler's prune pass
  on the captured full-sequence graph, once with `compensate: lstsq` (least-squares refit of
  o_proj/down_proj; `--lstsq sequential`, the default, or `oneshot`) and once without; the same units go in both rows. Target: the ppl
  increase with compensation at least 30% smaller.
- `mixed`: every block's linears at `--high` or `--low` bits (RTN asymmetric, groups of
  `--group`), the fraction f of blocks at low bits chosen in the order of a layer importance
  (least important first, `--orders`): `bi` (block influence: LWQ's input/output change),
  `outlier` (weight-outlier fraction), `sensitivity` (held-back NLL increase with only that
  block at low bits), `random` (seed 0) and `reverse` (the first importance order reversed). f = 0.5 with 4/2 bits is an average of 3.0 bits; `uniform W3` is the
  reference at the same size.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/llm_structure.py --model smollm2 --parts remove,prune,mixed
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rewrite import llm_data, models  # noqa: E402

import llm_blocks  # noqa: E402
import llm_sim  # noqa: E402
from rewrite.passes import quantize_methods as qm  # noqa: E402
from rewrite.passes.quantize import effective_group  # noqa: E402

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def heldback_windows(tok, n_tokens: int) -> torch.Tensor:
    """The last `n_tokens` of wiki-train as 512-token windows (after every calibration chunk of the recipe)."""
    ids = llm_data.wiki_tokens(tok, "train")
    n_chunks = ids.numel() // llm_data.WINDOW
    last_calib_end = ((llm_data.CALIB_CHUNKS - 1) * n_chunks // llm_data.CALIB_CHUNKS + 1) * llm_data.WINDOW
    if ids.numel() - n_tokens < last_calib_end:
        raise ValueError(f"--heldback {n_tokens} overlaps the calibration chunks; at most {ids.numel() - last_calib_end}")
    return ids[-n_tokens:].view(-1, llm_data.WINDOW).clone()


def dev_ppl(model, tok, n_tokens: int) -> float:
    return llm_data.perplexity(model, tok, n_tokens=n_tokens, batch_size=4)


def fmt_rel(ppl: float, ref: float) -> str:
    return f"{100 * (ppl / ref - 1):+.1f}%"


# --------------------------------------------------------------------------- remove
def compile_full_sequence(model, spec: dict, calib: torch.Tensor):
    """The compiler on the model's captured full-sequence graph (no cache): calibration = the chunks,
    2 per batch (passes hold back the last batches themselves). Returns (compiled, seconds)."""
    from rewrite.compiler import compile as rcompile
    from rewrite.program import Program
    from rewrite.spec import Spec

    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(2)]
    example = {"input_ids": calib[:1, :64], "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    m = copy.deepcopy(model)
    m.config.use_cache = False
    t0 = time.time()
    compiled = rcompile(Program.capture(m, example), Spec.parse(spec), example_inputs=example, calibration=batches,
                        task=None, progress=False)
    for rec in compiled.report.passes:
        log(f"{rec.name}: {rec.summary}; " + "; ".join(rec.notes))
    return compiled, time.time() - t0


def stand_in_program(model, blocks: list[int], calib: torch.Tensor):
    """The skip pass with `compensate: linear`: `blocks` removed, each replaced by its fitted linear
    stand-in. Returns (program, compile seconds, the pass's stand-in rows)."""
    prefix = "model.layers" if getattr(model, "model", model) is not model else "layers"
    compiled, secs = compile_full_sequence(
        model, {"passes": [{"kind": "skip", "layers": [f"{prefix}.{i}" for i in blocks], "compensate": "linear"}]}, calib)
    rows = next(r for r in compiled.report.passes if r.kind == "skip").details["stand-ins"]
    for row in rows:
        log(f"  {row}")
    return compiled.program, secs, rows


def program_ppl(program, tok, n_tokens: int) -> float:
    def fwd(ids):
        return llm_data.logits_of(program(input_ids=ids, attention_mask=torch.ones_like(ids)))
    return llm_data.perplexity(None, tok, n_tokens=n_tokens, batch_size=4, forward=fwd)


def program_nll(program, held: torch.Tensor) -> float:
    """Mean next-token NLL of the held-back windows under a compiled full-sequence program."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in held.split(4):
            logits = llm_data.logits_of(program(input_ids=ids, attention_mask=torch.ones_like(ids)))
            s, c = llm_data.window_nll(logits, ids)
            total, count = total + s, count + c
    return total / count


def part_remove(model, tok, args, calib, held, fp32: float) -> None:
    k = args.blocks
    t0 = time.time()
    updates: list[torch.Tensor] = []
    bi = llm_blocks.block_influence(llm_blocks.BlockRunner(model, list(calib.split(4))), updates)
    t_bi = time.time() - t0
    log("block influence: " + ", ".join(f"{i}:{s:.4f}" for i, s in enumerate(bi)))
    peer = llm_blocks.shortgpt_choice(bi, k)
    held_runner = llm_blocks.BlockRunner(model, list(held.split(4)))
    n = len(llm_sim.decoder_layers(model))
    d = model.config.hidden_size
    choices = [("ShortGPT (block influence, one-shot)", peer, t_bi, "remove")]
    if args.mean_update:
        choices.append(("ShortGPT's blocks, each replaced by its mean update", peer, t_bi, "mean"))
    if args.stand_ins:
        choices.append(("ours: ShortGPT's blocks, each replaced by a fitted linear stand-in (skip pass, "
                        "`compensate: linear`)", peer, t_bi, "linear"))
    if args.stand_in_search >= 0:
        t0 = time.time()
        cal_runner = llm_blocks.BlockRunner(model, list(calib.split(4)))
        picked, _ = llm_blocks.stand_in_greedy(cal_runner, held_runner, k, log, shortlist=args.stand_in_search or None)
        del cal_runner
        choices.append((f"ours: greedy WITH stand-ins by held-back NLL (shortlist {args.stand_in_search or 'all'}), "
                        "then the skip pass's stand-ins", picked, time.time() - t0, "linear"))
    ours = path = []
    if args.shortlist >= 0:
        t0 = time.time()
        ours, path = llm_blocks.greedy_removal(held_runner, k, log, shortlist=args.shortlist or None)
        choices.append((f"greedy by held-back NLL (shortlist {args.shortlist or 'all'})", ours, time.time() - t0, "remove"))
    rows = []
    for name, blocks, secs, how in choices:
        added = 0
        if how == "mean":
            m = llm_blocks.replace_blocks(copy.deepcopy(model), blocks, updates)
            held_nll = float("nan")
            ppl = dev_ppl(m, tok, args.tokens)
        elif how == "linear":
            m, compile_s, stand_ins = stand_in_program(model, blocks, calib)
            secs += compile_s
            added = sum(r.get("params added", 0) for r in stand_ins)
            held_nll = program_nll(m, held)
            ppl = program_ppl(m, tok, args.tokens)
        else:
            keep = [i for i in range(n) if i not in blocks]
            held_nll = held_runner.nll(held_runner.run(held_runner.h0, keep))
            m = llm_blocks.remove_blocks(copy.deepcopy(model), blocks)
            ppl = dev_ppl(m, tok, args.tokens)
        del m
        rows.append((name, blocks, math.exp(held_nll), ppl, secs, added))
        log(f"{name}: dev ppl {ppl:.3f}")
    block_params = sum(p.numel() for p in llm_sim.decoder_layers(model)[0].parameters())
    print(f"\n## Remove {k} of {n} blocks ({args.model}); fp32 dev ppl {fp32:.3f}; one block holds "
          f"{block_params / 1e6:.2f}M parameters, a stand-in {d * (d + 1) / 1e6:.2f}M\n")
    print("| choice | blocks removed | params added M | held-back ppl | dev ppl | vs fp32 | search + fit s |\n"
          "|---|---|---|---|---|---|---|")
    for name, blocks, hp, ppl, secs, added in rows:
        print(f"| {name} | {', '.join(map(str, sorted(blocks)))} | {added / 1e6:.2f} | {hp:.3f} | {ppl:.3f} | "
              f"{fmt_rel(ppl, fp32)} | {secs:.0f} |")
    for name, _, _, ppl, _, _ in rows[1:]:
        gain = 1 - ppl / rows[0][3]
        print(f"\n{name} vs ShortGPT: {100 * gain:.1f}% lower dev ppl (target >= 15%: {'met' if gain >= 0.15 else 'NOT met'})")
    if ours:
        print(f"greedy order {ours}, held-back nll path {', '.join(f'{x:.4f}' for x in path)}", flush=True)


# --------------------------------------------------------------------------- prune
def part_prune(model, tok, args, calib, held, fp32: float) -> None:
    amount = args.prune
    rows = []
    for comp in [False if c == "none" else c for c in args.prune_rows.split(",")]:
        spec = {"passes": [
            {"kind": "prune", "granularity": "head", "amount": amount, "importance": "wanda", "allocation": "global",
             "compensate": comp, "lstsq": args.lstsq},
            {"kind": "prune", "granularity": "neuron", "amount": amount, "importance": "wanda", "compensate": comp,
             "lstsq": args.lstsq}]}
        compiled, secs = compile_full_sequence(model, spec, calib)
        program = compiled.program
        params = sum(v.numel() for v in program.params().values())
        ppl = program_ppl(program, tok, args.tokens)
        rows.append((f"with compensation (lstsq, {args.lstsq})" if comp else "without compensation", params, ppl, secs))
        log(f"prune compensate={comp}: dev ppl {ppl:.3f}, params {params}")
        del compiled, program
    base_params = sum(p.numel() for p in model.parameters())
    print(f"\n## Prune {100 * amount:.0f}% of heads (GQA-aware, global) and FFN neurons, wanda ({args.model}); "
          f"fp32 dev ppl {fp32:.3f}, {base_params / 1e6:.1f}M params\n")
    print("| row | params M | dev ppl | vs fp32 | compile s |\n|---|---|---|---|---|")
    for name, params, ppl, secs in rows:
        print(f"| {name} | {params / 1e6:.1f} | {ppl:.3f} | {fmt_rel(ppl, fp32)} | {secs:.0f} |")
    if len(rows) == 2:
        inc_without, inc_with = rows[0][2] - fp32, rows[1][2] - fp32
        cut = 1 - inc_with / inc_without
        print(f"\nppl increase {inc_without:.3f} without -> {inc_with:.3f} with compensation: {100 * cut:.1f}% smaller "
              f"(target >= 30%: {'met' if cut >= 0.30 else 'NOT met'})", flush=True)


# --------------------------------------------------------------------------- mixed
def quantize_block(layer: torch.nn.Module, bits: int, g: int) -> callable:
    """RTN (asymmetric, groups of g) of every linear of one block in place; returns the undo."""
    saved = []
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().float()
                saved.append((m, m.weight.detach().clone()))
                m.weight.copy_(qm.rtn(w, bits, effective_group(w.shape[1], g), False).weight().to(m.weight.dtype))

    def undo() -> None:
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)
    return undo


def mixed_orders(model, args, calib, held) -> dict[str, list[int]]:
    """Block orders, least important first (those go to low bits first); `--orders` picks which.

    bi: block influence on the calibration chunks (LWQ's input/output change); outlier: the
    fraction of the block's weights with |z| > 1 (`passes.importance.layer.outlier_fraction`,
    data-free); sensitivity: held-back NLL increase with only that block at low bits (30 runs
    of the held-back text); random: seed 0; reverse: the first of bi/sensitivity reversed.
    """
    from rewrite.passes.importance.layer import outlier_fraction

    layers = llm_sim.decoder_layers(model)
    n = len(layers)
    asked = args.orders.split(",")
    out: dict[str, list[int]] = {}
    for k in asked:
        if k == "sensitivity":
            runner = llm_blocks.BlockRunner(model, list(held.split(4)))
            sens = llm_blocks.single_block_sensitivity(runner, lambda i: quantize_block(layers[i], args.low, args.group))
            log("sensitivity (held-back dNLL at low bits): " + ", ".join(f"{i}:{s:.4f}" for i, s in enumerate(sens)))
            out[k] = sorted(range(n), key=lambda i: sens[i])
        elif k == "bi":
            bi = llm_blocks.block_influence(llm_blocks.BlockRunner(model, list(calib.split(4))))
            out[k] = sorted(range(n), key=lambda i: bi[i])
        elif k == "outlier":
            frac = [outlier_fraction([m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]) for layer in layers]
            log("outlier fraction: " + ", ".join(f"{i}:{f:.4f}" for i, f in enumerate(frac)))
            out[k] = sorted(range(n), key=lambda i: frac[i])
        elif k == "random":
            rnd = list(range(n))
            random.Random(0).shuffle(rnd)
            out[k] = rnd
        elif k != "reverse":
            raise SystemExit(f"unknown order {k!r}; valid: sensitivity, bi, outlier, random, reverse")
    if "reverse" in asked:
        first = next(k for k in asked if k in ("sensitivity", "bi", "outlier"))
        out[f"reverse ({first})"] = out[first][::-1]
    return out


def part_mixed(model, tok, args, calib, held, fp32: float) -> None:
    layers = llm_sim.decoder_layers(model)
    n = len(layers)
    t0 = time.time()
    orders = mixed_orders(model, args, calib, held)
    t_orders = time.time() - t0
    for k, o in orders.items():
        log(f"order {k}: {o}")
    fractions = [float(f) for f in args.fractions.split(",")]

    def score(low_blocks: list[int], bits_all: int | None = None) -> float:
        undos = []
        for i in range(n):
            b = bits_all if bits_all is not None else (args.low if i in low_blocks else args.high)
            undos.append(quantize_block(layers[i], b, args.group))
        try:
            return dev_ppl(model, tok, args.tokens)
        finally:
            for u in reversed(undos):
                u()

    ref = {f"uniform W{args.high}": score([], args.high), "uniform W3": score([], 3)}
    for k, v in ref.items():
        log(f"{k}: {v:.3f}")
    curve: dict[str, dict[float, float]] = {k: {} for k in orders}
    for f in fractions:
        m = int(round(f * n))
        for k, o in orders.items():
            curve[k][f] = score(o[:m])
            log(f"{k} f={f} ({m} blocks): {curve[k][f]:.3f}")
    print(f"\n## Mixed precision W{args.high}/W{args.low} by block, RTN asym g{args.group} ({args.model}); fp32 dev ppl "
          f"{fp32:.3f}; orders from held-back/calibration text in {t_orders:.0f}s\n")
    print(" | ".join(f"{k} {v:.3f} ({fmt_rel(v, fp32)})" for k, v in ref.items()) + "\n")
    head = [f"f={f} ({int(round(f * n))}/{n}, {args.high - (args.high - args.low) * int(round(f * n)) / n:.2f} bits)"
            for f in fractions]
    print("| order | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for k in orders:
        print(f"| {k} | " + " | ".join(f"{curve[k][f]:.2f} ({fmt_rel(curve[k][f], fp32)})" for f in fractions) + " |")
    if 0.5 in fractions and args.high + args.low == 6:
        w3 = ref["uniform W3"]
        for k in orders:
            v = curve[k][0.5]
            print(f"3.0 bits, order {k}: {v:.3f} vs uniform W3 {w3:.3f} ({'better' if v < w3 else 'NOT better'})"
                  + (f", vs random {curve['random'][0.5]:.3f} ({'better' if v < curve['random'][0.5] else 'NOT better'})"
                     if "random" in curve and k != "random" else ""))
    near = {k: max([f for f in fractions if curve[k][f] <= 1.10 * ref[f'uniform W{args.high}']], default=0.0)
            for k in orders}
    print("largest fraction within 10% of uniform W%d's ppl: " % args.high + ", ".join(f"{k} {v}" for k, v in near.items()),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--parts", default="remove,prune,mixed")
    ap.add_argument("--tokens", type=int, default=llm_data.PPL_TOKENS, help="wiki-dev tokens scored (recipe: 32768)")
    ap.add_argument("--calib", type=int, default=16, help="calibration chunks of 512 wiki-train tokens")
    ap.add_argument("--heldback", type=int, default=2048, help="last wiki-train tokens the searches are scored on")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to remove (default: 4 of 30, 2 of 18)")
    ap.add_argument("--shortlist", type=int, default=10,
                    help="greedy removal: after step 1 only the blocks cheapest to remove alone (0: all; -1: no greedy row)")
    ap.add_argument("--mean-update", action="store_true",
                    help="remove: also ShortGPT's blocks each replaced by its mean residual update on calibration text")
    ap.add_argument("--no-stand-ins", dest="stand_ins", action="store_false",
                    help="remove: leave out the row with ShortGPT's blocks replaced by fitted linear stand-ins")
    ap.add_argument("--stand-in-search", type=int, default=-1,
                    help="remove: also a greedy search that scores each candidate with its fitted stand-in, "
                         "shortlist after step 1 (0: all; -1: no such row)")
    ap.add_argument("--prune", type=float, default=0.2)
    ap.add_argument("--prune-rows", default="none,lstsq", help="prune: rows, compensation none and/or lstsq")
    ap.add_argument("--lstsq", choices=("sequential", "oneshot"), default="sequential",
                    help="prune: how the compensated row refits (the prune spec's lstsq; sequential is the default)")
    ap.add_argument("--high", type=int, default=4)
    ap.add_argument("--low", type=int, default=2)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--orders", default="bi,outlier,random,reverse",
                    help="mixed: block orders (sensitivity, bi, outlier, random, reverse)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = MODELS[args.model]
    model, tok = models.load(name)
    model.eval()
    model.config.use_cache = False
    n = len(llm_sim.decoder_layers(model))
    if args.blocks is None:
        args.blocks = max(1, round(n * 4 / 30)) if n != 18 else 2
    calib = llm_data.calibration_chunks(tok, n=args.calib)
    held = heldback_windows(tok, args.heldback)
    t0 = time.time()
    fp32 = dev_ppl(model, tok, args.tokens)
    print(f"# {type(model).__name__} ({name}), {n} blocks; wiki-dev N={args.tokens}; calibration {args.calib}x512 "
          f"wiki-train; held-back last {args.heldback} wiki-train tokens; fp32 dev ppl {fp32:.3f} ({time.time() - t0:.0f}s)",
          flush=True)
    parts = {"remove": part_remove, "prune": part_prune, "mixed": part_mixed}
    for p in args.parts.split(","):
        parts[p](model, tok, args, calib, held, fp32)


if __name__ == "__main__":
    main()
