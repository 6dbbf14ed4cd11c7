"""Where independent measurements run: in this process, or as Ray tasks on many workers.

Plan search measures many candidates that do not depend on each other (the allocator's
cost table, the candidate plans of `rewrite search`). Each candidate needs the same heavy
state first (a captured, cleaned-up program and the calibration data), so an executor
runs in two steps:

- `setup(*args)` builds the state once per worker (locally: once);
- `work(state, item)` measures one item; results come back in the items' order, whatever
  order the workers finished in.

`LocalExecutor` runs both here. `RayExecutor` starts one Ray actor per worker, runs
`setup` in each (the arguments travel once, by reference), then spreads the items over
the actors. Ray starts in-process (`ray.init` with `num_workers` CPUs) unless
`RAY_ADDRESS` names a cluster. The state must be rebuilt by `setup` from picklable
arguments (models, tensors, specs): captured graphs themselves do not pickle.

Both give the same results for deterministic work; timings measured inside `work` come
from whichever machine ran it, so latency ratios should be taken within one item.

Example:
    >>> from rewrite.executor import executor_for
    >>> def setup(offset):
    ...     return {"offset": offset}
    >>> def work(state, item):
    ...     return item + state["offset"]
    >>> executor_for("local").map(setup, (10,), work, [1, 2, 3])
    [11, 12, 13]
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import RewriteError
from .progress import bar

log = logging.getLogger("rewrite")

Setup = Callable[..., Any]
Work = Callable[[Any, Any], Any]


class LocalExecutor:
    """Everything in this process, one item after another."""

    name = "local"

    def map(self, setup: Setup, setup_args: Sequence[Any], work: Work, items: Sequence[Any], *,
            description: str = "measuring") -> list[Any]:
        """`[work(state, item) for item in items]` with `state = setup(*setup_args)`."""
        state = setup(*setup_args)
        return [work(state, item) for item in bar(items, description, unit="candidate")]


class RayExecutor:
    """Items spread over `num_workers` Ray actors, each holding its own `setup` state."""

    name = "ray"

    def __init__(self, num_workers: int | None = None, address: str | None = None):
        self.num_workers = num_workers or int(os.environ.get("REWRITE_RAY_WORKERS", "2"))
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise RewriteError("executor 'ray' needs Ray: pip install -e \".[ray]\" (or use executor: local)") from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, runtime_env=self._runtime_env(), logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=self.num_workers, runtime_env=self._runtime_env(), include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
        return ray

    @staticmethod
    def _runtime_env() -> dict[str, Any]:
        """Workers import this checkout of rewrite (not another install) with one thread each."""
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        return {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}

    def map(self, setup: Setup, setup_args: Sequence[Any], work: Work, items: Sequence[Any], *,
            description: str = "measuring") -> list[Any]:
        """Like `LocalExecutor.map`; each actor runs `setup` once, items go to idle actors."""
        ray = self._ray()
        if not items:
            return []

        @ray.remote(num_cpus=1)
        class _Worker:
            def __init__(self, setup_fn: Setup, *args: Any):  # top-level ObjectRefs arrive resolved
                self.state = setup_fn(*args)

            def run(self, work_fn: Work, item: Any) -> Any:
                return work_fn(self.state, item)

        args_ref = [ray.put(a) for a in setup_args]
        workers = [_Worker.remote(setup, *args_ref) for _ in range(min(self.num_workers, len(items)))]
        results: list[Any] = [None] * len(items)
        try:
            done = self._spread(ray, workers, work, items, results)
            for _ in bar(done, f"{description} on {len(workers)} Ray workers", total=len(items), unit="candidate"):
                pass
        finally:
            for w in workers:
                ray.kill(w)
        return results

    @staticmethod
    def _spread(ray: Any, workers: list[Any], work: Work, items: Sequence[Any], results: list[Any]) -> Iterator[int]:
        """Give each idle actor the next item; yield each item's index as its result lands in `results`."""
        queue = list(range(len(items)))
        idle = list(workers)
        pending: dict[Any, tuple[int, Any]] = {}
        while queue or pending:
            while queue and idle:
                i, worker = queue.pop(0), idle.pop()
                pending[worker.run.remote(work, items[i])] = (i, worker)
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, worker = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:  # the worker's own exception, raised here
                raise exc.as_instanceof_cause() from None
            except ray.exceptions.ActorDiedError as exc:  # its setup failed (or the worker was killed)
                raise RewriteError(f"a Ray worker died before measuring item {i}: {str(exc).splitlines()[-1]}") from None
            idle.append(worker)
            yield i


def executor_for(name: str | None) -> LocalExecutor | RayExecutor:
    """The executor a spec or the CLI names: "local" (default) or "ray"."""
    if name in (None, "local"):
        return LocalExecutor()
    if name == "ray":
        return RayExecutor()
    raise RewriteError(f"unknown executor {name!r}: use 'local' or 'ray'")
