"""Quantization benchmark on all-MiniLM-L6-v2: STS-B Spearman, exported size, onnxruntime latency.

Side by side in one run: the fp32 export; onnxruntime's own `quantize_dynamic` (int8) and
`MatMulNBitsQuantizer` (int4, block 32) applied to that export; ours at W8, W4 (RTN / AWQ /
GPTQ) with 8- and 4-bit embeddings, W3, layer-wise mixed precision at average 3.0 and 2.5
(importance order / random / reversed, the Layer-Wise Quantization ablation), and W8A8.

Calibration: 128 STS-train sentences. Metric: STS-B dev Spearman x 100 (onnxruntime for
exported rows; the ablation rows marked `torch` are scored on the rewritten torch module,
whose numerics the export matches). Latency: onnxruntime CPU, 1 thread, one batch of 8
sentences; each model is timed interleaved with the fp32 export (A,B,A,B...), median over
rounds, ratio to the fp32 median of the same interleaved run. The table is reprinted after
every row, so a partial run still reports what it measured.

    python benchmarks/quantize.py --out /tmp/qbench   # everything (about an hour on 2 busy cores)
    python benchmarks/quantize.py --only fp32,w4_gptq_e4 --rounds 10
"""
from __future__ import annotations

import sys
from pathlib import Path

# run as a script, benchmarks/ is sys.path[0] and its token.py would shadow the stdlib module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import rewrite  # noqa: E402
from rewrite import demo  # noqa: E402


def q(weights=None, **kw):
    return {"kind": "quantize", "weights": weights, **kw}


MIXED = lambda avg, order, widths=(2, 4): q({"bits": list(widths), "average": avg, "group_size": 32},  # noqa: E731
                                           method="gptq", allocate="layerwise", importance="block_influence",
                                           order=order, embeddings=4)
CONFIGS: dict[str, dict | str] = {  # in run order: the rows the targets need come first
    "fp32": "fp32",
    "ort_quantize_dynamic": "peer",
    "w8a8_dynamic": q(None, activations={"mode": "dynamic"}, embeddings=8),  # verify: see VERIFY
    "w4_gptq_e4": q({"bits": 4, "group_size": 32}, method="gptq", embeddings=4),
    "w4_gptq_g128_e4row": q({"bits": 4, "group_size": 128}, method="gptq", embeddings=4, embeddings_group_size=-1),
    "w4_gptq_g128sym_e4row": q({"bits": 4, "group_size": 128, "symmetric": True}, method="gptq", embeddings=4,
                               embeddings_group_size=-1),
    "ort_matmulnbits_int4": "peer",
    "mixed3.0_importance": MIXED(3.0, "importance"),
    "mixed3.0_random": MIXED(3.0, "random"),
    "mixed3.0_reverse": MIXED(3.0, "reverse"),
    "w4_rtn_e4": q({"bits": 4, "group_size": 32}, embeddings=4),
    "w4_awq_e4": q({"bits": 4, "group_size": 32}, method="awq", embeddings=4),
    "mixed2.5_importance": MIXED(2.5, "importance", (2, 3)),
    "mixed2.5_random": MIXED(2.5, "random", (2, 3)),
    "mixed2.5_reverse": MIXED(2.5, "reverse", (2, 3)),
    "w3_gptq_e4": q({"bits": 3, "group_size": 32}, method="gptq", embeddings=4),
    "w8_rtn_e8": q({"bits": 8, "group_size": 128}, embeddings=8),
    "w4_rtn_e8": q({"bits": 4, "group_size": 32}, embeddings=8),
    "w4_awq_e8": q({"bits": 4, "group_size": 32}, method="awq", embeddings=8),
    "w4_gptq_e8": q({"bits": 4, "group_size": 32}, method="gptq", embeddings=8),
}
VERIFY = {"w8a8_dynamic": {"backend_rtol": 0.15}}
"""int8 activations: rounding flips from 1e-7 float differences add up over layers (see
specs/quantize-w8a8.yaml); each int8 op itself matches onnxruntime exactly."""
TORCH_ONLY = {n for n in CONFIGS if n.startswith("mixed")} | {"w4_awq_e8", "w4_rtn_e8"}
"""Scored on the rewritten torch module (no export) to fit the run in the time budget; the
export of these graphs is covered by tests (same ops, matched to 1e-4 in onnxruntime)."""


def ort_callable(path: str):
    from rewrite.backends.onnx import session

    sess = session(path, threads=1, provider=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def fn(input_ids, attention_mask):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return torch.from_numpy(sess.run(None, {n: feeds[n] for n in names})[0])

    fn.session = sess
    fn.names = names
    return fn


def mb(path: str) -> float:
    p = Path(path)
    extra = Path(str(p) + ".data")
    return (p.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated config names")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse rows (and exports) saved in --out by an earlier run; latency is always re-measured")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    if "fp32" not in names:
        names.insert(0, "fp32")
    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=128, batch_size=16)
    example = demo.example_inputs(tok)
    folder = Path(args.out or tempfile.mkdtemp(prefix="rewrite-quant-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    fns = {}
    for name in names:
        try:
            saved = folder / f"{name}.json"
            if args.reuse and saved.exists():
                rows[name] = json.loads(saved.read_text())
                if rows[name].get("scored_on") == "onnxruntime":
                    fns[name] = ort_callable(str(folder / f"{name}.onnx"))
                print(f"[{name}] reused {saved}", flush=True)
            else:
                _run_one(name, model, tok, calib, example, folder, rows, fns)
                saved.write_text(json.dumps(rows[name]))
            if name in fns and name != "fp32" and "fp32" in fns:
                _latency({"fp32": fns["fp32"], name: fns[name]}, tok, rows, args.rounds)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            print(f"[{name}] FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        _print(rows)
    print(f"\nexported models in {folder}")


def _run_one(name, model, tok, calib, example, folder, rows, fns) -> None:
    if True:
        cfg = CONFIGS[name]
        t0 = time.time()
        path = str(folder / f"{name}.onnx")
        row: dict = {"config": name}
        if cfg == "peer":
            _peer(name, str(folder / "fp32.onnx"), path)
        else:
            passes = [{"kind": "cleanup"}] + ([] if cfg == "fp32" else [cfg])
            out = rewrite.compile(model, {"passes": passes, "calibration": {"samples": 128, "batch_size": 16},
                                          "verify": VERIFY.get(name, {})},
                                  example_inputs=example, calibration=calib)
            last = out.report.passes[-1]
            row["weights_mb"] = last.cost.weight_bytes / 1e6
            if cfg != "fp32":
                layer_rows = [r for r in last.details["layers"] if r["op"] != "embedding"]
                n = sum(r["bytes_before"] // 4 for r in layer_rows)
                row["avg_bits"] = sum(r["bits"] * r["bytes_before"] // 4 for r in layer_rows) / max(n, 1)
                if "allocation" in last.details:
                    row["allocation"] = " ".join(f"{a['layer'].split('.')[-1]}:{a['bits']}" for a in
                                                 sorted(last.details["allocation"], key=lambda a: a["layer"]))
            if name in TORCH_ONLY:
                row["spearman"] = demo.sts_score(out.module, tok)
                row["scored_on"] = "torch"
                rows[name] = row
                print(f"[{name}] {time.time() - t0:.0f}s spearman {row['spearman']:.2f}", flush=True)
                return
            rec = out.export(path, verify_inputs=[example, calib[-1]])
            row["ort_rel_error"] = rec.rel_error
        fn = ort_callable(path)
        fns[name] = fn
        row["spearman"] = demo.sts_score(fn, tok)
        row["scored_on"] = "onnxruntime"
        row["size_mb"] = mb(path)
        rows[name] = row
        print(f"[{name}] {time.time() - t0:.0f}s spearman {row['spearman']:.2f} size {row['size_mb']:.1f} MB", flush=True)


def _peer(name: str, fp32_path: str, path: str) -> None:
    import onnx

    if name == "ort_quantize_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        m = onnx.load(fp32_path)
        qz = MatMulNBitsQuantizer(m, block_size=32, is_symmetric=False)
        qz.process()
        onnx.save(qz.model.model, path)


def _latency(fns: dict, tok, rows: dict, rounds: int) -> None:
    batch = demo.tokenize(tok, demo.calibration_sentences(8, seed=3))
    feeds = {k: v.numpy() for k, v in batch.kwargs.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():  # warm up
        fn.session.run(None, {n: feeds[n] for n in fn.names})
    for _ in range(rounds):
        for n, fn in fns.items():
            f = {k: feeds[k] for k in fn.names}
            t = time.perf_counter()
            fn.session.run(None, f)
            times[n].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"])
    for n, ts in times.items():
        if n == "fp32":
            rows[n]["latency_ms"], rows[n]["latency_ratio"] = base * 1e3, 1.0
            continue
        rows[n]["latency_ms"] = statistics.median(ts) * 1e3
        rows[n]["latency_ratio"] = statistics.median(ts) / base


def _print(rows: dict) -> None:
    fp = rows["fp32"]["spearman"]
    cols = ["config", "scored_on", "spearman", "drop", "size_mb", "weights_mb", "avg_bits", "latency_ms", "latency_ratio", "ort_rel_error"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows.values():
        r["drop"] = fp - r["spearman"]
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) and c == "ort_rel_error" else f"{v:.2f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    alloc = [(n, r["allocation"]) for n, r in rows.items() if "allocation" in r]
    if alloc:
        print("\nLayer-wise assignments (block: bits):")
        for n, a in alloc:
            print(f"  {n}: {a}")


if __name__ == "__main__":
    main()
