"""Calibration: batches from the user, a held-back split, and one streaming run over them.

`CalibrationData.from_user` normalises whatever iterable the user gave (a list of batches, a
DataLoader) into `Inputs`, capped at `samples`, and keeps some batches back for verifying
fidelity. `observe` runs a Program over the batches once with an fx.Interpreter and feeds
every value a subscriber asked for to that subscriber: statistics are streamed (each
subscriber keeps running sums), so memory does not grow with the number of batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .errors import CalibrationError
from .inputs import Inputs
from .program import Program


@dataclass
class CalibrationData:
    batches: list[Inputs] = field(default_factory=list)
    holdout: list[Inputs] = field(default_factory=list)
    from_example: bool = False
    """True when no calibration was given and the example inputs stand in for it."""

    @classmethod
    def from_user(cls, data: Iterable[Any] | None, example: Inputs, *, samples: int = 128, holdout: float = 0.125,
                  check_shapes: bool = True) -> "CalibrationData":
        if data is None:
            return cls([example], [example], from_example=True)
        batches: list[Inputs] = []
        seen = 0
        try:
            iterator = iter(data)
        except TypeError:
            raise CalibrationError(f"calibration must be an iterable of batches (a list or a DataLoader), got {type(data).__name__}") from None
        for index, raw in enumerate(iterator):
            try:
                batch = Inputs.of(raw)
            except CalibrationError as exc:
                raise CalibrationError(f"calibration batch {index}: {exc}") from None
            problem = batch.mismatch(example) if check_shapes else None  # generation graphs: past length varies
            if problem:
                raise CalibrationError(f"calibration batch {index} does not match example_inputs: {problem}")
            batches.append(batch)
            seen += batch.batch_size()
            if seen >= samples:
                break
        if not batches:
            raise CalibrationError("calibration is empty: give at least one batch, or calibration=None to use the example inputs")
        n_hold = 0 if len(batches) < 2 else max(1, int(round(len(batches) * holdout)))
        if n_hold == 0:
            return cls(batches, batches[-1:])
        return cls(batches[:-n_hold], batches[-n_hold:])

    def require(self, who: str) -> None:
        """Raise when a pass that needs real calibration data got none."""
        if self.from_example:
            raise CalibrationError(
                f"{who} needs calibration data: pass calibration=<iterable of batches shaped like "
                "example_inputs> to rewrite.compile (or --calibration on the CLI)"
            )


class Subscriber(Protocol):
    """Wants the runtime values of some nodes during a calibration run."""

    def nodes(self, program: Program) -> Iterable[fx.Node]: ...

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None: ...


class _ObservingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, watchers: dict[fx.Node, list[Subscriber]]):
        super().__init__(module, garbage_collect_values=True)
        self.watchers = watchers
        self.batch: Inputs | None = None

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        for sub in self.watchers.get(n, ()):
            sub.update(n, value, self.batch)
        return value


def observe(program: Program, batches: list[Inputs], subscribers: list[Subscriber], *, desc: str = "calibrating", progress: bool | None = None) -> list[Any]:
    """Run the program once over `batches`, feeding watched values to their subscribers.

    Returns nothing interesting (the per-batch outputs are dropped); the subscribers hold
    the statistics. Nodes are matched by identity, so call `nodes()` on this program.
    """
    watchers: dict[fx.Node, list[Subscriber]] = {}
    for sub in subscribers:
        for node in sub.nodes(program):
            watchers.setdefault(node, []).append(sub)
    interp = _ObservingInterpreter(program.module, watchers)
    show = _show_progress(progress, len(batches))
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
            interp.batch = batch
            flat = program.flat_inputs(batch)
            interp.run(*flat)
    return []


class _AllCaptured(Exception):
    """Stops a `capture` run once every wanted value is known (the rest of the graph is skipped)."""


def capture(program: Program, batch: Inputs | Any, nodes: Iterable[fx.Node]) -> dict[fx.Node, Any]:
    """The values of `nodes` when the program runs on one batch; the run stops at the last of them."""
    wanted = set(nodes)
    got: dict[fx.Node, Any] = {}

    class _Recorder:
        def nodes(self, program: Program) -> list[fx.Node]:
            return list(wanted)

        def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
            got[node] = value
            if len(got) == len(wanted):
                raise _AllCaptured

    if not wanted:
        return got
    recorder = _Recorder()
    interp = _ObservingInterpreter(program.module, {n: [recorder] for n in wanted})
    batch = Inputs.of(batch)
    interp.batch = batch
    try:
        with torch.no_grad():
            interp.run(*program.flat_inputs(batch))
    except _AllCaptured:
        pass
    return got


def _show_progress(progress: bool | None, n: int) -> bool:
    """An explicit flag wins; else a bar only when the current call asked for progress."""
    from .progress import enabled

    if progress is not None:
        return progress
    return n > 1 and enabled()


def split_batches(items: list[Any], batch_size: int) -> list[list[Any]]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def n_batches(samples: int, batch_size: int) -> int:
    return max(1, math.ceil(samples / batch_size))


Stat = Callable[[torch.Tensor], torch.Tensor]
