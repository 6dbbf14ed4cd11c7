"""Held-back wiki-train perplexity of SmolLM2 through the compiler: rotation and GPTQ variants.

Captures the full-sequence graph once (task=None) and compiles it with each variant's passes
(calibration: 16 chunks of 512 wiki-train tokens, the README's spacing; 2 of the 8 batches held
back for the quantize pass's fit check); perplexity on the last 4096 wiki-train tokens (8
windows of 512, never calibrated on) run on the compiled graph. Variants: rot (rotation only:
must equal fp32), rot+rtn, rot+gptq_seq, gptq_seq_norm, gptq_norm, rot+gptq_seq_norm, ...

    OMP_NUM_THREADS=1 python benchmarks/llm_rotate_gptq.py rot,gptq_seq_norm,rot+gptq_seq_norm [CALIB_CHUNKS]
"""
import sys, time, math, torch
from pathlib import Path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from rewrite import llm_data, models
from rewrite.compiler import compile as rcompile
from rewrite.program import Program
model, tok = models.load("smollm2-135m"); model.eval(); model.config.use_cache = False
ids = llm_data.wiki_tokens(tok, "train")
calib = llm_data.calibration_chunks(tok, n=int(sys.argv[2]) if len(sys.argv) > 2 else 16)
hold = ids[-4096:].view(8, 512)
ex = {"input_ids": calib[:1, :64], "attention_mask": torch.ones(1, 64, dtype=torch.long)}
t = time.time()
prog = Program.capture(model, ex)
print("captured", f"{time.time()-t:.0f}s", flush=True)
batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(2)]
def ppl(p):
    tot = n = 0
    with torch.inference_mode():
        for b in hold.split(2):
            out = p(input_ids=b, attention_mask=torch.ones_like(b))
            s, c = llm_data.window_nll(llm_data.logits_of(out), b)
            tot += s; n += c
    return math.exp(tot / n)
Q4 = lambda method, **g: {"kind": "quantize", "weights": {"bits": 4, "group_size": 128, "symmetric": False},
                          "method": method, "exclude": ["lm_head"], **({"gptq": g} if g else {})}
variants = {
    "rot": [{"kind": "rotate"}],
    "rot+rtn": [{"kind": "rotate"}, Q4("rtn")],
    "rot+gptq_seq": [{"kind": "rotate"}, Q4("gptq", sequential=True)],
    "gptq_seq_norm": [Q4("gptq", sequential=True, token_weight="normalized")],
    "gptq_norm": [Q4("gptq", token_weight="normalized")],
    "rot+gptq_seq_norm": [{"kind": "rotate"}, Q4("gptq", sequential=True, token_weight="normalized")],
    "rot+gptq_seq_ao": [{"kind": "rotate"}, Q4("gptq", sequential=True, act_order=True)],
}
for name in sys.argv[1].split(","):
    t = time.time()
    spec = {"calibration": {"samples": len(calib), "batch_size": 2, "holdout": 0.125}, "passes": variants[name],
            "verify": {"max_cosine_drop": 2.0}}
    c = rcompile(prog, spec, example_inputs=ex, calibration=batches, task=None, progress=False)
    ct = time.time() - t
    print(name, round(ppl(c.program), 3), f"compile {ct:.0f}s", [n for r in c.report.passes for n in getattr(r, 'notes', [])][:6] if hasattr(c, 'report') else "", flush=True)
