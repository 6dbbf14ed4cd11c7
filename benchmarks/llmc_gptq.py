"""llm-compressor's GPTQModifier as a peer of `benchmarks/llm_quality.py`, run in its own venv.

llm-compressor pins its own transformers/compressed-tensors, so it lives in a separate venv
(`/work/venvs/llmc`: `pip install torch==2.13.0 && pip install llmcompressor`) and this script
runs there as a subprocess. The parent passes everything that must be identical across rows:
the converted model folder, the calibration chunks and the perplexity windows (token ids in a
.pt file); this script quantizes with `oneshot(recipe=GPTQModifier(...))` and scores the windows
with the data README's recipe (the first token of each window not predicted, mean NLL, exp).

    /work/venvs/llmc/bin/python benchmarks/llmc_gptq.py MODEL_DIR DATA.pt BITS GROUP OUT.json
"""
from __future__ import annotations

import sys
from pathlib import Path

# run as a script, benchmarks/ is sys.path[0] and its token.py would shadow the stdlib module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    model_dir, data_path, bits, group, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = torch.load(data_path)
    calib, windows = data["calibration"], data["windows"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    scheme = {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                  "strategy": "group", "group_size": group}}
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.time()
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(model_dir), dataset=ds, recipe=recipe, max_seq_length=calib.shape[1], num_calibration_samples=calib.shape[0])
    seconds = time.time() - t0
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for b in windows.split(4):
            logits = model(input_ids=b, attention_mask=torch.ones_like(b)).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            nll = -lp.gather(-1, b[:, 1:, None]).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
    with open(out, "w") as f:
        json.dump({"ppl": math.exp(total / count), "seconds": seconds, "scheme": scheme}, f)


if __name__ == "__main__":
    main()
