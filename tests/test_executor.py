"""Plan search on Ray: the allocator's cost table measured by 2 local Ray workers gives the
same table and the same chosen plan as the local executor."""
from __future__ import annotations

import pytest

import rewrite
from rewrite.errors import RewriteError
from rewrite.executor import LocalExecutor, RayExecutor, executor_for


def _table(compiled: rewrite.Compiled) -> tuple[list[dict], list[str]]:
    record = compiled.report.passes[-1]
    table = record.details["cost table (each setting alone)"]
    chosen = next(p for p in record.details["plans (chosen and rejected)"] if p["verdict"] == "chosen")
    return table, chosen["knobs"]


def test_executor_names():
    assert isinstance(executor_for(None), LocalExecutor)
    assert isinstance(executor_for("ray"), RayExecutor)
    with pytest.raises(RewriteError, match="unknown executor 'dask'"):
        executor_for("dask")


@pytest.mark.slow
def test_ray_workers_give_the_local_cost_table_and_plan(bert_flops_budget):
    pytest.importorskip("ray")
    import ray

    spec, z, local = bert_flops_budget  # the same compile on the local executor (tests/conftest.py)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env=RayExecutor()._runtime_env())
        remote = rewrite.compile(z.model, {**spec, "executor": "ray"}, example_inputs=z.example, calibration=z.calibration,
                                 progress=False)
    finally:
        ray.shutdown()
    local_table, local_plan = _table(local)
    remote_table, remote_plan = _table(remote)
    assert [k["name"] for k in remote_table] == [k["name"] for k in local_table]
    for a, b in zip(local_table, remote_table):
        assert a["flops_ratio"] == pytest.approx(b["flops_ratio"], rel=1e-9), a["name"]
        assert a["bytes_saved"] == b["bytes_saved"], a["name"]
        assert a["cosine_drop"] == pytest.approx(b["cosine_drop"], abs=1e-6), a["name"]
    assert remote_plan == local_plan


def test_search_grid_validates_every_combination_before_work():
    from rewrite.errors import SpecError
    from rewrite.search import grid_specs

    base = {"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.1}]}
    specs = grid_specs(base, ["passes.0.amount=0.25,0.5", "passes.0.importance=magnitude,wanda"])
    assert [setting for setting, _ in specs] == [
        {"passes.0.amount": 0.25, "passes.0.importance": "magnitude"}, {"passes.0.amount": 0.25, "passes.0.importance": "wanda"},
        {"passes.0.amount": 0.5, "passes.0.importance": "magnitude"}, {"passes.0.amount": 0.5, "passes.0.importance": "wanda"}]
    assert base["passes"][0]["amount"] == 0.1  # the base spec is not changed
    with pytest.raises(SpecError, match="amount"):
        grid_specs(base, ["passes.0.amount=0.25,1.5"])  # 1.5 is out of range: refused before any compile
    with pytest.raises(SpecError, match="the spec has no passes.3"):
        grid_specs(base, ["passes.3.amount=0.1"])
    with pytest.raises(SpecError, match="KEY=V1,V2"):
        grid_specs(base, ["passes.0.amount"])


def test_search_pareto_front_and_best():
    from rewrite.search import Point, best, mark_pareto

    pts = [Point({"a": i}, {}, cosine_drop=d, weight_mb=mb, latency_ratio=lat)
           for i, (d, mb, lat) in enumerate([(0.001, 10, 0.9), (0.002, 8, 0.7), (0.003, 9, 0.8), (0.05, 5, 0.4)])]
    pts.append(Point({"a": 4}, {}, error="does not apply"))
    mark_pareto(pts)
    assert [p.pareto for p in pts] == [True, True, False, True, False]  # #2 is beaten by #1 on all three
    assert best(pts, max_drop=0.01).setting == {"a": 1}
    assert best(pts, max_drop=0.0001) is None
