"""Layer skipping on all-MiniLM-L6-v2: STS-B accuracy per importance and search, and ORT latency.

    python benchmarks/skip.py [--limit N] [--repeats R]

Part 1 (accuracy): every importance kind x {oneshot, greedy, beam} removes 1 and 2 blocks, and 2
and 4 single branches (attention, then MLP), with the skip pass itself on one captured
program (calibration: STS *train* sentences; evaluation: STS-B dev Spearman x100). Block
influence one-shot is the peer (ShortGPT's method). Part 2 (speed): the pipeline
(`rewrite.compile`, cleanup + skip fidelity_drop beam) for 0, 1 and 2 blocks removed,
exported to ONNX, timed in onnxruntime on CPU interleaved (A, B, C, A, B, C, ...), medians,
beside the FLOPs ratio at the same input.
"""
from __future__ import annotations

import os
import sys

# benchmarks/token.py would shadow the stdlib `token` module: run with the repo root on the path instead
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

import rewrite  # noqa: E402
from rewrite.passes.canonicalize import canonicalize  # noqa: E402
from rewrite.passes.cleanup import CleanupPass  # noqa: E402
from rewrite.passes.importance.layer import mean_output_cosine  # noqa: E402
from rewrite.passes.skip import SkipPass  # noqa: E402
from rewrite import Program, Spec, demo  # noqa: E402
from rewrite.calibration import CalibrationData  # noqa: E402
from rewrite.measure import count_flops  # noqa: E402
from rewrite.passmanager import PassContext  # noqa: E402

KINDS = ("block_influence", "outlier_fraction", "fidelity_drop")
SEARCHES = ("oneshot", "greedy", "beam")
SETTINGS = [("block", 1), ("block", 2), ("attention", 2), ("attention", 4), ("mlp", 2), ("mlp", 4)]


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "| " + " | ".join(c.ljust(w[c]) for c in cols) + " |"
    sep = "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")).ljust(w[c]) for c in cols) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def sts(fn, tok, limit: int | None) -> float:
    """`demo.sts_score`'s metric (mean pooling, cosine, Spearman x100), batching sentences by length.

    Masked mean pooling makes each embedding independent of its batch, so sorting by
    length only saves padding work; the numbers match `demo.sts_score` up to float noise.
    """
    pairs = demo.sts_pairs("dev", limit)
    sents = sorted({s for p in pairs for s in (p.s1, p.s2)}, key=lambda s: (len(tok(s)["input_ids"]), s))
    index = {s: i for i, s in enumerate(sents)}
    emb = demo.embed(fn, tok, sents, batch_size=128)
    cos = [float(emb[index[p.s1]] @ emb[index[p.s2]]) for p in pairs]
    return 100.0 * demo.spearman(cos, [p.score for p in pairs])


def accuracy(model, tok, limit: int | None) -> tuple[list[dict], float]:
    example = demo.example_inputs(tok)
    calib = CalibrationData.from_user(demo.calibration_batches(tok, 128, 16), example, samples=128)
    original = Program.capture(model, example)
    canonicalize(original)
    original = CleanupPass(Spec.parse({"passes": [{"kind": "cleanup"}]}).passes[0]).run(original, None).program
    original.finalize()
    base = sts(original.module, tok, limit)
    print(f"uncompressed STS-B dev Spearman x100: {base:.2f}", flush=True)
    scored: dict[tuple[str, ...], float] = {}
    rows = []
    for gran, k in SETTINGS:
        for kind in KINDS:
            for search in SEARCHES:
                spec = Spec.parse({"passes": [{"kind": "skip", "layers": k, "granularity": gran, "importance": kind, "search": search}]})
                ctx = PassContext(spec=spec, calibration=calib, original=original)
                t = time.perf_counter()
                res = SkipPass(spec.passes[0]).run(original.clone(), ctx)
                res.program.finalize()
                secs = time.perf_counter() - t
                removed = tuple(res.details["removed"])
                key = tuple(sorted(removed))
                if key not in scored:
                    scored[key] = sts(res.program.module, tok, limit)
                score = scored[key]
                traj = res.details["trajectory"]
                rows.append({
                    "removed": f"{k} {gran}", "importance": kind, "search": search,
                    "peer": "ShortGPT" if (kind, search, gran) == ("block_influence", "oneshot", "block") else "",
                    "chosen (in order)": ", ".join(r.replace("encoder.layer.", "L") for r in removed),
                    "holdout cos": f"{traj[-1]['holdout cosine']:.4f}", "STS-B": f"{score:.2f}",
                    "drop": f"{base - score:.2f}", "search s": f"{secs:.1f}", "_sts": score,
                })
                print(table(rows[-1:], list(rows[-1])[:-1]).splitlines()[-1], flush=True)
    return rows, base


def speed(model, tok, repeats: int) -> list[dict]:
    example = demo.example_inputs(tok)
    calib = demo.calibration_batches(tok, 128, 16)
    from rewrite.backends.onnx import feeds_for, session

    feeds_batch = demo.tokenize(tok, [p.s1 for p in demo.sts_pairs("dev", 16)], pad_to=64)
    builds = []
    with tempfile.TemporaryDirectory() as d:
        for k in (0, 1, 2):
            passes = [{"kind": "cleanup"}] + ([{"kind": "skip", "layers": k, "importance": "fidelity_drop", "search": "beam"}] if k else [])
            out = rewrite.compile(model, {"passes": passes}, example_inputs=example, calibration=calib)
            path = Path(d) / f"skip{k}.onnx"
            out.export(path, verify_inputs=[feeds_batch])
            flops = count_flops(out.program, feeds_batch)
            sess = session(path, threads=1)
            feeds = feeds_for(sess, out.program, feeds_batch)
            removed = out.report.passes[-1].details.get("removed", []) if k else []
            builds.append({"k": k, "sess": sess, "feeds": feeds, "flops": flops, "removed": removed, "times": []})
        for b in builds:  # warm-up
            for _ in range(3):
                b["sess"].run(None, b["feeds"])
        for _ in range(repeats):
            for b in builds:
                t = time.perf_counter()
                b["sess"].run(None, b["feeds"])
                b["times"].append(time.perf_counter() - t)
    base = builds[0]
    rows = []
    for b in builds:
        med = statistics.median(b["times"])
        ideal = base["flops"] / b["flops"]
        got = statistics.median(base["times"]) / med
        rows.append({"blocks removed": b["k"], "removed": ", ".join(b["removed"]) or "-",
                     "GFLOPs": f"{b['flops'] / 1e9:.3f}", "ideal speedup (FLOPs)": f"{ideal:.3f}",
                     "ORT median ms": f"{med * 1e3:.2f}", "measured speedup": f"{got:.3f}",
                     "measured / ideal": f"{got / ideal:.3f}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="STS-B dev pairs (default: all 1500)")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = demo.load_minilm()
    start = time.time()
    if not args.skip_accuracy:
        rows, base = accuracy(model, tok, args.limit)
        cols = [c for c in rows[0] if not c.startswith("_")]
        print(f"\n## STS-B dev (Spearman x100), uncompressed {base:.2f}; calibration/search on 128 STS train sentences\n")
        print(table(rows, cols))
        print("\n## Targets")
        for gran, k, limit in (("block", 1, 0.5), ("block", 2, 2.0)):
            peer = next(r for r in rows if r["removed"] == f"{k} {gran}" and r["importance"] == "block_influence" and r["search"] == "oneshot")
            best = next(r for r in rows if r["removed"] == f"{k} {gran}" and r["importance"] == "fidelity_drop" and r["search"] == "beam")
            drop = base - best["_sts"]
            print(f"- {k} block(s), fidelity_drop beam: drop {drop:.2f} (target <= {limit}: {'met' if drop <= limit else 'NOT met'}); "
                  f"block influence one-shot drop {base - peer['_sts']:.2f} -> "
                  f"{'better' if best['_sts'] > peer['_sts'] else 'NOT better'} than the peer")
    if args.skip_speed:
        print(f"\n(total {time.time() - start:.0f} s)")
        return
    rows = speed(model, tok, args.repeats)
    print("\n## onnxruntime CPU latency (1 thread, batch 16 x 64 tokens, interleaved, medians)\n")
    print(table(rows, list(rows[0])))
    for r in rows[1:]:
        ok = float(r["measured / ideal"]) >= 0.9
        print(f"- {r['blocks removed']} block(s): measured speedup {r['measured speedup']} vs ideal {r['ideal speedup (FLOPs)']} "
              f"= {r['measured / ideal']} of ideal (target >= 0.90: {'met' if ok else 'NOT met'})")
    print(f"\n(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
