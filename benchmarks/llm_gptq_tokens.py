"""Why GPTQ lost to RTN on SmolLM2: held-back perplexity of one-shot GPTQ W4 g128 under token weightings of X^T X.

Held-back text: the last 4096 tokens of wiki-train (8 windows of 512, never in the calibration);
calibration: 16 chunks of 512 with the data README's spacing. Every decoder-block linear is
quantized (asymmetric W4, groups of 128, 64 where K = 576); one-shot Hessians from the float
model, gathered by forward hooks; `passes.quantize_methods.gptq` does the rounding. Each spec
is WEIGHTING[:PART]: WEIGHTING in plain (uniform X^T X), clip (tokens above 4x the median norm
scaled down), norm (every token by (median/|x|)^2); PART in attn/mlp/nodown quantizes only
those linears with GPTQ (RTN elsewhere). Prints how many calibration tokens exceed 4x the
median norm per input, then one line per spec.

    OMP_NUM_THREADS=1 python benchmarks/llm_gptq_tokens.py plain,clip,norm
"""
import sys, time, math, torch
from pathlib import Path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from rewrite import llm_data, models
from rewrite.passes import quantize_methods as qm
from rewrite.passes.quantize import effective_group
model, tok = models.load("smollm2-135m"); model.eval()
ids = llm_data.wiki_tokens(tok, "train")
calib = llm_data.calibration_chunks(tok, n=16)
hold = ids[-4096:].view(8, 512)
def ppl(m):
    tot = n = 0
    with torch.inference_mode():
        for b in hold.split(4):
            s, c = llm_data.window_nll(m(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False).logits, b)
            tot += s; n += c
    return math.exp(tot / n)
lins = {nm: m for nm, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
key = {}
for nm in lins:
    key[nm] = nm.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
W = ["plain", "clip", "norm"]
G = {w: {} for w in W}
stat = {}
def mk(nm):
    def hook(m, a, o):
        x = a[0].detach().double().reshape(-1, a[0].shape[-1])
        nrm = x.norm(dim=1)
        med = nrm.median()
        ws = {"plain": torch.ones_like(nrm), "clip": (4 * med / nrm).clamp(max=1) ** 2, "norm": (med / nrm.clamp_min(1e-6)) ** 2}
        for w in W:
            xw = x * ws[w].sqrt()[:, None]
            G[w][nm] = G[w].get(nm, 0) + xw.T @ xw
        s = stat.setdefault(nm, [0, 0]); s[0] += int((nrm > 4 * med).sum()); s[1] += x.shape[0]
    return hook
hs = [lins[nm].register_forward_hook(mk(nm)) for nm in set(key.values())]
with torch.inference_mode():
    for b in calib.split(4):
        model(input_ids=b, attention_mask=torch.ones_like(b), use_cache=False)
for h in hs: h.remove()
print("outlier tokens (>4x median norm):", {k: v[0] for k, v in stat.items() if v[0]}, flush=True)
base = {k: v.clone() for k, v in model.state_dict().items()}
def apply_rtn():
    apply("plain", lambda nm: False)


def apply(wt, which=lambda nm: True):
    model.load_state_dict(base)
    with torch.no_grad():
        for nm, m in lins.items():
            w = m.weight.detach().float(); g = effective_group(w.shape[1], 128)
            if which(nm):
                h = G[wt][key[nm]]
                m.weight.copy_(qm.gptq(w, (h / torch.diag(h).mean()).float(), 4, g, False).weight())
            else:
                m.weight.copy_(qm.rtn(w, 4, g, False).weight())
for spec in sys.argv[1].split(","):
    if spec == "rtn":
        apply_rtn()
        print("rtn held-back ppl", round(ppl(model), 3), flush=True)
        continue
    wt, _, part = spec.partition(":")
    which = {"": lambda n: True, "attn": lambda n: "self_attn" in n, "mlp": lambda n: "mlp" in n,
             "nodown": lambda n: "down" not in n}[part]
    t = time.time(); apply(wt, which); print(spec, "held-back ppl", round(ppl(model), 3), f"{time.time()-t:.0f}s", flush=True)
