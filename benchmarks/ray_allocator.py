"""The budget allocator on Ray: 2 local workers vs the local executor, same plan, wall time.

Runs `budget: {latency: 0.5}` on all-MiniLM-L6-v2 (STS-B train calibration, the spec's
default calibration size) twice in one process: with `executor: local`, then with
`executor: ray` on an in-process Ray cluster of `--workers` workers. Prints the chosen plan
of each, whether they agree, each cost-table row's measured values side by side, and the
wall-time ratio. Latency ratios are measured on whichever worker ran a row (each against its
own base measurement), so on a loaded machine they can differ between the two runs: the
table shows by how much.

    python benchmarks/ray_allocator.py [--workers 2] [--budget 0.5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.append(str(Path(__file__).resolve().parent.parent))

import rewrite  # noqa: E402
from rewrite import demo  # noqa: E402
from rewrite.executor import RayExecutor  # noqa: E402


def run(executor: str, model, example, calibration, budget: float) -> tuple[float, dict]:
    spec = {"passes": [{"kind": "cleanup"}], "budget": {"latency": budget}, "executor": executor}
    start = time.perf_counter()
    compiled = rewrite.compile(model, spec, example_inputs=example, calibration=calibration, progress=True)
    seconds = time.perf_counter() - start
    return seconds, compiled.report.passes[-1].details


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args(argv)
    import ray

    model, tok = demo.load_minilm()
    spec = rewrite.Spec()
    calibration = demo.calibration_batches(tok, samples=spec.calibration.samples, batch_size=spec.calibration.batch_size,
                                           seed=spec.calibration.seed)
    example = demo.example_inputs(tok)
    local_s, local = run("local", model, example, calibration, args.budget)
    os.environ["REWRITE_RAY_WORKERS"] = str(args.workers)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, runtime_env=RayExecutor._runtime_env())
    try:
        ray_s, remote = run("ray", model, example, calibration, args.budget)
    finally:
        ray.shutdown()

    def plan(details: dict) -> list[str]:
        return next(p for p in details["plans (chosen and rejected)"] if p["verdict"] == "chosen")["knobs"]

    print(f"\n## budget latency {args.budget} on all-MiniLM-L6-v2: local vs Ray ({args.workers} workers)\n")
    print("| setting | cosine drop local | cosine drop ray | latency ratio local | latency ratio ray |")
    print("|---|---|---|---|---|")
    for a, b in zip(local["cost table (each setting alone)"], remote["cost table (each setting alone)"]):
        print(f"| {a['name']} | {a['cosine_drop']:.5f} | {b['cosine_drop']:.5f} | {a['latency_ratio']:.3f} | {b['latency_ratio']:.3f} |")
    print(f"\nchosen plan, local: {' + '.join(plan(local))}")
    print(f"chosen plan, ray:   {' + '.join(plan(remote))}")
    print(f"same plan: {plan(local) == plan(remote)}")
    print(f"wall time: local {local_s:.1f} s, ray {ray_s:.1f} s, ratio ray/local {ray_s / local_s:.2f} "
          f"(this machine has {os.cpu_count()} cores; the workers share them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
