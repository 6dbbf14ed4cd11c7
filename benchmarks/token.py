"""Token pruning benchmark: STS-B accuracy of all-MiniLM-L6-v2 and onnxruntime speed vs FLOPs.

Part 1 (accuracy): STS-B dev Spearman x100 (mean pooling over the kept real tokens,
`rewrite.demo.mean_pool`) of the uncompressed model and of token-pruned versions: keep 0.7
and 0.5 after block 2, and a progressive schedule, for each importance kind, with and
without merge, all in one run. Targets: keep 0.7 -> drop <= 1.0; keep 0.5 -> drop <= 2.5.

Part 2 (speed): onnxruntime CPU latency (batch 16, medians of interleaved runs A,B,C,A,B,C...)
of the exported models at ~128 and ~256 tokens, for MiniLM and a ViT-Base-sized model with
random weights, next to the FLOPs ratio (FlopCounterMode on the same inputs, the ideal).
Target: measured speedup >= 80% of the ideal.

    python benchmarks/token.py                 # both parts
    python benchmarks/token.py --part sts      # accuracy only
    python benchmarks/token.py --part latency --reps 5
"""
from __future__ import annotations

import os as _os
import sys as _sys

# Run as a script, this file's folder comes first on sys.path and its name shadows the
# standard library's `token` module (imported by tokenize, inspect, ...): drop the folder.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _HERE]

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewrite  # noqa: E402
from rewrite.backends.onnx import feeds_for, session  # noqa: E402
from rewrite import demo  # noqa: E402
from rewrite.inputs import Inputs  # noqa: E402
from rewrite.measure import count_flops  # noqa: E402

KINDS = ("cls_attention", "attention_rank", "norm", "mean_distance", "pooled_influence")
VIT_VARIANTS = ("uncompressed", "keep 0.5 after 2")
PROGRESSIVE = [1.0, 1.0, 0.8, 0.65, 0.5, 0.5]
CONFIGS = [  # label, keep, after, target drop
    ("keep 0.7 after 2", 0.7, [2], 1.0),
    ("keep 0.5 after 2", 0.5, [2], 2.5),
    ("progressive " + "/".join(f"{r:g}" for r in PROGRESSIVE), PROGRESSIVE, None, None),
]


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "| " + " | ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|"] + [line([r[c] for c in cols]) for r in rows])


def token_spec(keep, after, importance="cls_attention", merge=False) -> dict:
    p = {"kind": "token", "keep": keep, "importance": importance, "merge": merge}
    if after is not None:
        p["after"] = after
    return {"passes": [p]}


# ---------------------------------------------------------------------- accuracy
def sts_bucketed(fn, tok, pairs, batch_size: int = 64) -> tuple[float, float]:
    """(STS-B Spearman x100, fraction of real tokens that reached the output) of `fn`.

    Like `demo.sts_score` (mean pooling over the kept real tokens, `demo.mean_pool`), but the
    sentences are batched by token length so that rows carry almost no padding: k is computed
    from the padded length S, so heavy padding would make a keep ratio drop fewer real tokens.
    """
    sents = sorted({s for p in pairs for s in (p.s1, p.s2)})
    lengths = [len(tok(s, truncation=True, max_length=128)["input_ids"]) for s in sents]
    order = sorted(range(len(sents)), key=lambda i: (lengths[i], sents[i]))
    emb = [None] * len(sents)
    real = kept = 0
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            batch = demo.tokenize(tok, [sents[j] for j in chunk], 128)
            hidden = demo.last_hidden(batch.call(fn))
            mask = batch.kwargs["attention_mask"]
            pooled = demo.mean_pool(hidden.float(), mask)
            real += int(mask.sum())
            kept += int(mask.sum(1).clamp(max=hidden.shape[1]).sum())
            for j, e in zip(chunk, pooled):
                emb[j] = e
    index = {s: i for i, s in enumerate(sents)}
    cos = [float(emb[index[p.s1]] @ emb[index[p.s2]]) for p in pairs]
    return 100.0 * demo.spearman(cos, [p.score for p in pairs]), kept / real


def token_program(base, spec: dict):
    """Apply the token pass to a clone of the captured program (runs eagerly; no re-export needed)."""
    from rewrite.passmanager import pass_for
    from rewrite.spec import Spec

    program = base.clone()
    token = Spec.parse(spec).passes[0]
    result = pass_for(token).run(program, None)
    result.program.finalize()
    return result.program


def sts_part(skip: frozenset[str] = frozenset()) -> list[dict]:
    from rewrite.passes.canonicalize import canonicalize
    from rewrite.program import Program

    model, tok = demo.load_minilm()
    pairs = demo.sts_pairs("dev")
    flop_batch = demo.tokenize(tok, [p.s1 for p in pairs[:64]])
    base_prog = Program.capture(model, demo.example_inputs(tok))
    canonicalize(base_prog)
    base_flops = count_flops(base_prog, flop_batch)
    t0 = time.perf_counter()
    base, _ = sts_bucketed(model, tok, pairs)
    rows = [{"importance": "-", "merge": "-", "config": "uncompressed", "spearman": f"{base:.2f}", "drop": "0.00",
             "target": "-", "met": "-", "real tokens out": "1.000", "FLOPs ratio": "1.000"}]
    print(f"uncompressed: {base:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    order = [(c, merge, kind) for c in range(len(CONFIGS)) for merge in (False, True) for kind in KINDS]
    for c, merge, kind in order:
        label, keep, after, target = CONFIGS[c]
        if f"{kind}/{'merge' if merge else 'drop'}/{c}" in skip:
            continue
        t0 = time.perf_counter()
        program = token_program(base_prog, token_spec(keep, after, kind, merge))
        score, frac = sts_bucketed(program.module, tok, pairs)
        drop = base - score
        flops = count_flops(program, flop_batch)
        rows.append({"importance": kind, "merge": "yes" if merge else "no", "config": label,
                     "spearman": f"{score:.2f}", "drop": f"{drop:.2f}",
                     "target": f"<= {target}" if target is not None else "-",
                     "met": ("yes" if drop <= target else "NO") if target is not None else "-",
                     "real tokens out": f"{frac:.3f}", "FLOPs ratio": f"{flops / base_flops:.3f}"})
        print(f"{kind} merge={merge} {label}: {score:.2f} (drop {drop:.2f}, real tokens out {frac:.3f}) "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


# ------------------------------------------------------------------------- speed
def _vit(image_size: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _time_interleaved(sessions: list, feeds: list, reps: int) -> list[float]:
    times: list[list[float]] = [[] for _ in sessions]
    for s, f in zip(sessions, feeds):  # warm-up
        s.run(None, f)
    for _ in range(reps):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _measure(name: str, variants: list[tuple[str, dict]], model: torch.nn.Module, example: Inputs,
             inputs_at: dict[str, Inputs], flop_inputs_at: dict[str, Inputs], reps: int, threads: int, tmp: Path) -> list[dict]:
    compiled = []
    for label, spec in variants:
        out = rewrite.compile(model, spec, example_inputs=example)
        path = tmp / f"{name}-{len(compiled)}.onnx".replace(" ", "_")
        out.export(path)
        compiled.append((label, out, session(path, threads=threads)))
    rows = []
    for size, batch in inputs_at.items():
        flops = [count_flops(out.program, flop_inputs_at[size]) for _, out, _ in compiled]
        feeds = [feeds_for(sess, out.program, batch) for _, out, sess in compiled]
        lat = _time_interleaved([s for _, _, s in compiled], feeds, reps)
        for (label, _, _), f, t in zip(compiled, flops, lat):
            ideal = flops[0] / f
            real = lat[0] / t
            rows.append({"model": name, "tokens": size, "variant": label, "latency ms": f"{t * 1e3:.1f}",
                         "speedup": f"{real:.2f}", "ideal (FLOPs)": f"{ideal:.2f}",
                         "% of ideal": f"{100 * real / ideal:.0f}%" if label != "uncompressed" else "-",
                         "met (>=80%)": ("yes" if real >= 0.8 * ideal else "NO") if label != "uncompressed" else "-"})
        print(table(rows[-len(compiled):]), flush=True)
    return rows


def latency_part(reps: int, threads: int) -> list[dict]:
    variants = [("uncompressed", {"passes": []}),
                ("keep 0.7 after 2", token_spec(0.7, [2])),
                ("keep 0.5 after 2", token_spec(0.5, [2])),
                ("keep 0.5 after 2, pooled_influence", token_spec(0.5, [2], "pooled_influence")),
                ("keep 0.5 after 2 + merge", token_spec(0.5, [2], merge=True)),
                ("progressive", token_spec(PROGRESSIVE, None))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = demo.load_minilm()
        g = torch.Generator().manual_seed(0)
        text = {}
        for S in (128, 256):
            ids = torch.randint(1000, 30000, (16, S), generator=g)
            ids[:, 0] = 101
            text[str(S)] = Inputs((), {"input_ids": ids, "attention_mask": torch.ones(16, S, dtype=torch.long)})
        rows += _measure("all-MiniLM-L6-v2", variants, model, demo.example_inputs(tok), text, text, reps, threads, Path(tmp))
        for image, tokens in ((176, 122), (256, 257)):
            vit = _vit(image)
            g = torch.Generator().manual_seed(1)
            x16 = Inputs((torch.randn(16, 3, image, image, generator=g),), {})
            x2 = Inputs((x16.args[0][:2],), {})
            vit_variants = [(lbl, s) for lbl, s in variants if lbl in VIT_VARIANTS]  # ViT-Base exports are slow
            rows += _measure("ViT-Base (random)", vit_variants, vit, x2, {str(tokens): x16}, {str(tokens): x2}, max(2, reps // 2),
                             threads, Path(tmp))
            del vit
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["sts", "latency", "all"], default="all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="STS rows to skip, as kind/drop|merge/config-index")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("sts", "all"):
        rows = sts_part(frozenset(args.skip))
        print("\n## STS-B dev Spearman x100, all-MiniLM-L6-v2 (mean pooling over kept real tokens)\n")
        print(table(rows), flush=True)
    if args.part in ("latency", "all"):
        rows = latency_part(args.reps, args.threads)
        print(f"\n## onnxruntime CPU latency, batch 16, {args.threads} threads, medians of interleaved runs\n")
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
