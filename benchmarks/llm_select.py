"""Select decoder weight-quantization settings on held-back wiki-TRAIN text, through the compiler.

The protocol of the LLM specs (`specs/llm-w4.yaml`, `specs/llm-w3.yaml`): settings are chosen here,
never on wiki-dev (which `benchmarks/llm_quality.py` reports once). Calibration: C chunks of 512
wiki-train tokens with the data README's spacing (chunk i * n_chunks // C). Held-back text: H
windows of 512 wiki-train tokens that are NOT calibration chunks (chunk i * n_chunks // H + 3 for
the 128-chunk spacing has 7 unused chunks between two calibration chunks, so + 3 is never one of
them for C <= 128; the script asserts it). The full-sequence graph is captured once (task=None) and
compiled with each variant's passes; perplexity runs on the compiled graph.

    OMP_NUM_THREADS=1 python benchmarks/llm_select.py --model smollm2 --bits 4 --variants rtn,seq_norm,seq_norm_ao_clip
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rewrite import llm_data, models  # noqa: E402
from rewrite.compiler import compile as rcompile  # noqa: E402
from rewrite.program import Program  # noqa: E402

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def quant(bits: int, method: str, **gptq) -> dict:
    return {"kind": "quantize", "weights": {"bits": bits, "group_size": 128, "symmetric": False},
            "method": method, "exclude": ["lm_head"], **({"gptq": gptq} if gptq else {})}


def variant(bits: int, name: str) -> list[dict]:
    """Passes of a variant name: fp32 | rot | [rot_]rtn | [rot_](seq|oneshot)[_norm][_ao][_clip][_float][_refitN][_dampX].
    seq: GPTQ sequential (each layer's Hessian on the quantized prefix, true-sequential inside a block);
    norm: normalized token weights; ao: act-order (static groups); clip: per-group range by
    Hessian-diagonal-weighted error; float: each layer fitted to the float model's output (drift
    corrected); refitN: N rounds of scale refit + GPTQ on the refitted grid; dampX: damping X; rot: residual stream rotated by a randomised Hadamard first."""
    parts = name.split("_")
    passes: list[dict] = []
    if parts[0] == "rot":
        passes.append({"kind": "rotate"})
        parts = parts[1:]
    if not parts or parts == ["fp32"]:
        return passes
    if parts == ["rtn"]:
        return passes + [quant(bits, "rtn")]
    assert parts[0] in ("seq", "oneshot"), f"unknown variant {name!r}"
    opts: dict = {"sequential": parts[0] == "seq"}
    for p in parts[1:]:
        if p == "norm":
            opts["token_weight"] = "normalized"
        elif p == "ao":
            opts["act_order"] = True
        elif p == "clip":
            opts["clip_search"] = True
        elif p == "float":
            opts["target"] = "float"
        elif p.startswith("refit"):
            opts["refit_rounds"] = int(p[5:])
        elif p.startswith("damp"):
            opts["damp"] = float(p[4:])
        else:
            raise ValueError(f"unknown variant part {p!r} in {name!r}")
    return passes + [quant(bits, "gptq", **opts)]


def held_back(tok, n: int, calib_n: int) -> torch.Tensor:
    ids = llm_data.wiki_tokens(tok, "train")
    n_chunks = ids.numel() // 512
    calib = {i * n_chunks // calib_n for i in range(calib_n)} | {i * n_chunks // 128 for i in range(128)}
    picks = [i * n_chunks // n + 3 for i in range(n)]
    assert not calib & set(picks), "held-back chunks overlap calibration chunks"
    return torch.stack([ids[c * 512:(c + 1) * 512] for c in picks])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--variants", default="rtn,seq_norm")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--held", type=int, default=16, help="held-back windows of 512 wiki-train tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="append each result as a JSON line here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load(MODELS[args.model])
    model.eval()
    model.config.use_cache = False
    calib = llm_data.calibration_chunks(tok, n=args.calib)
    hold = held_back(tok, args.held, args.calib)
    ex = {"input_ids": calib[:1, :64], "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    prog = Program.capture(model, ex)
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(4)]

    def ppl(p) -> float:
        tot = n = 0
        with torch.inference_mode():
            for b in hold.split(4):
                s, c = llm_data.window_nll(llm_data.logits_of(p(input_ids=b, attention_mask=torch.ones_like(b))), b)
                tot += s
                n += c
        return math.exp(tot / n)

    print(f"# {MODELS[args.model]} W{args.bits} g128 asym, calibration {args.calib}x512, held-back {args.held}x512 wiki-train",
          flush=True)
    for name in args.variants.split(","):
        t = time.time()
        if name == "fp32":
            print(f"fp32 {ppl(prog):.3f}", flush=True)
            continue
        spec = {"calibration": {"samples": len(calib), "batch_size": 4, "holdout": 0.125}, "passes": variant(args.bits, name),
                "verify": {"max_cosine_drop": 2.0}}
        c = rcompile(prog, spec, example_inputs=ex, calibration=batches, task=None, progress=False)
        secs = time.time() - t
        value = ppl(c.program)
        print(f"{name} {value:.3f} compile {secs:.0f}s", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"model": args.model, "bits": args.bits, "variant": name, "ppl": value,
                                    "calib": args.calib, "held": args.held, "compile_s": secs}) + "\n")


if __name__ == "__main__":
    main()
