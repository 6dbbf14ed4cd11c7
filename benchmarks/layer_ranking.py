"""Which layer of all-MiniLM-L6-v2 is least important? Every layer metric, checked on STS-B.

    python benchmarks/layer_ranking.py [--samples 128] [--batch-size 16] [--eval-pairs N]

Calibration: STS-B train sentences (`rewrite.demo.calibration_batches`), the last
`--holdout` batches held back for fidelity_drop. For each layer metric of
`passes.importance.layer` (block_influence, outlier_fraction, fidelity_drop) it prints the
per-layer scores, the layer the metric calls least important (lowest score), and the STS-B
dev Spearman (x100) of the model with that layer removed. As the reference, it also
removes every layer in turn and measures STS-B directly (the "oracle" row), and gives
each metric's Spearman rank correlation with the measured STS loss per layer.

Removing a layer here means deleting it from `model.encoder.layer` on a deep copy: that is
only this benchmark's measurement; the compiler's skip pass does it on the graph.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewrite import demo  # noqa: E402
from rewrite.program import Program  # noqa: E402

METRICS = ("block_influence", "outlier_fraction", "fidelity_drop")


def without_layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    del m.encoder.layer[index]
    return m.eval()


# -- fallbacks, used only when passes.importance.layer is not in this build ---------------
def _fallback_scores(model, batches, holdout, kind: str) -> dict[str, float]:
    layers = model.encoder.layer
    names = [f"encoder.layer.{i}" for i in range(len(layers))]
    if kind == "outlier_fraction":
        out = {}
        for name, layer in zip(names, layers):
            w = torch.cat([m.weight.detach().flatten() for m in layer.modules() if isinstance(m, torch.nn.Linear)])
            z = (w - w.mean()) / w.std()
            out[name] = float((z.abs() > 1).float().mean())
        return out
    if kind == "block_influence":
        sums = {n: 0.0 for n in names}
        count = 0
        store = {}
        hooks = [layer.register_forward_hook(lambda mod, a, o, n=n: store.__setitem__(n, (a[0], o[0] if isinstance(o, tuple) else o)))
                 for n, layer in zip(names, layers)]
        with torch.no_grad():
            for b in batches:
                b.call(model)
                mask = b.kwargs["attention_mask"].bool()
                for n in names:
                    x, y = store[n]
                    sums[n] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1))[mask].sum())
                count += int(mask.sum())
        for h in hooks:
            h.remove()
        return {n: s / count for n, s in sums.items()}
    out = {}
    with torch.no_grad():
        refs = [demo.last_hidden(b.call(model)) for b in holdout]
        for i, n in enumerate(names):
            m = without_layer(model, i)
            tot, cnt = 0.0, 0
            for b, ref in zip(holdout, refs):
                mask = b.kwargs["attention_mask"].bool()
                cos = torch.nn.functional.cosine_similarity(demo.last_hidden(b.call(m)), ref, dim=-1)[mask]
                tot += float((1 - cos).sum())
                cnt += int(mask.sum())
            out[n] = tot / cnt
    return out


def layer_metric_scores(model, program, batches, holdout) -> tuple[dict[str, dict[str, float]], str]:
    try:
        from rewrite.passes.importance.layer import layer_scores
    except ImportError:
        return {k: _fallback_scores(model, batches, holdout, k) for k in METRICS}, "benchmark fallback"
    out = {}
    for k in METRICS:
        out[k] = layer_scores(program, holdout if k == "fidelity_drop" else batches, k, original=program)
    return out, "passes.importance.layer"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--holdout", type=int, default=2, help="calibration batches held back for fidelity_drop")
    ap.add_argument("--eval-pairs", type=int, default=None, help="limit STS-B dev pairs (default: all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if demo.stsb_dir() is None:
        print("STS-B data not found (../shared/data/stsb): cannot run this benchmark", file=sys.stderr)
        return 1
    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=args.samples, batch_size=args.batch_size)
    batches, holdout = calib[: -args.holdout], calib[-args.holdout:]
    program = Program.capture(model, demo.example_inputs(tok))
    start = time.perf_counter()
    scores, source = layer_metric_scores(model, program, batches, holdout)
    t_metrics = time.perf_counter() - start
    n_layers = len(model.encoder.layer)
    names = [f"encoder.layer.{i}" for i in range(n_layers)]

    base = demo.sts_score(model, tok, limit=args.eval_pairs)
    removed = {}
    for i, n in enumerate(names):  # the oracle: measure every removal
        removed[n] = demo.sts_score(without_layer(model, i), tok, limit=args.eval_pairs)
    loss = {n: base - s for n, s in removed.items()}

    from scipy.stats import spearmanr

    print(f"all-MiniLM-L6-v2, calibration: {sum(b.batch_size() for b in batches)} STS-B train sentences "
          f"(+{sum(b.batch_size() for b in holdout)} held back), layer metrics from {source} in {t_metrics:.1f}s")
    print(f"STS-B dev Spearman x100, full model: {base:.2f} ({args.eval_pairs or 'all'} pairs)\n")
    head = ["metric"] + [f"L{i}" for i in range(n_layers)] + ["least important", "STS without it", "rank corr. with STS loss"]
    rows = []
    for k in METRICS:
        s = scores[k]
        least = min(names, key=lambda n: s[n])
        rho = spearmanr([s[n] for n in names], [loss[n] for n in names]).statistic
        rows.append([k] + [f"{s[n]:.4g}" for n in names] + [least.rsplit(".", 1)[-1], f"{removed[least]:.2f}", f"{rho:+.2f}"])
    least = min(names, key=lambda n: loss[n])
    rows.append(["oracle: STS loss"] + [f"{loss[n]:.2f}" for n in names] + [least.rsplit(".", 1)[-1], f"{removed[least]:.2f}", "+1.00"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("\nSTS-B dev with each layer removed: " + ", ".join(f"L{i} {removed[n]:.2f}" for i, n in enumerate(names)))
    print("(higher score = more important; 'least important' = lowest score; the oracle row is the measured STS loss)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
