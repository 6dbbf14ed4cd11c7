"""The compile report: what each pass did and what it cost, as data and as text.

A `Report` is a pydantic model (so it serialises to JSON losslessly) with renderers for a
terminal table, Markdown and JSON. Passes put their decisions (scores, removed groups,
bit assignments) in `PassRecord.details` and plain-language caveats in `notes`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .measure import Cost, Fidelity


class PassRecord(BaseModel):
    name: str
    kind: str
    seconds: float
    cost: Cost
    fidelity: Fidelity | None = None
    fidelity_calibration: Fidelity | None = None
    """The same fidelity on (some of) the calibration batches the passes fit on: next to `fidelity`
    (held-back batches) it shows over-fitting."""
    summary: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class ExportRecord(BaseModel):
    backend: str
    path: str
    bytes: int
    seconds: float
    verified: bool
    max_abs_error: float | None = None
    rel_error: float | None = None
    cosine: float | None = None
    provider: str | None = None
    notes: list[str] = Field(default_factory=list)
    tolerance: float | None = None
    """Relative tolerance verification used (of the output's largest magnitude)."""
    quantile: float | None = None
    """Fraction of output values that had to be within `tolerance` (1.0: all of them)."""
    batches: int | None = None
    """Samples the backend was checked on (held-back calibration batches, or the example inputs)."""

    def verdict(self) -> str:
        """One plain sentence: what was compared, the numbers, what they mean, and whether it passed."""
        runtime = "onnxruntime" if self.backend == "onnx" else self.backend
        where = f"{runtime} ({self.provider})" if self.provider else runtime
        if not self.verified or self.max_abs_error is None:
            return f"{where}: not verified against the torch module (export(verify=False))."
        samples = f"{self.batches} held-back sample(s)" if self.batches else "the example inputs"
        within = ("every output value" if (self.quantile or 1.0) >= 1.0 else f"{self.quantile:.0%} of output values")
        tol = f"{self.tolerance:.0e}" if self.tolerance is not None else "the tolerance"
        cos = f"; cosine similarity of the outputs {self.cosine:.6f} (1 = identical)" if self.cosine is not None else ""
        return (f"{where} matches the rewritten torch module on {samples}: largest difference {self.max_abs_error:.2e}, "
                f"which is {self.rel_error:.2e} of the largest output value{cos}; the check requires {within} within "
                f"{tol} of the largest output value: passed.")


class LatencyRecord(BaseModel):
    """Measured runtime of the exported original and rewritten models, side by side."""

    runtime: str
    shape: str
    """The inputs it was measured on, e.g. `input_ids 16x128, attention_mask 16x128`."""
    before_ms: float
    after_ms: float
    repeats: int
    threads: int | None = None

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms if self.before_ms else float("nan")

    def verdict(self, flops_ratio: float | None) -> str:
        """The latency change next to the FLOPs change, and a plain note when they disagree."""
        speed = f"{self.runtime} latency {_ms(self.before_ms)} ms -> {_ms(self.after_ms)} ms ({self.ratio:.2f}x, median of {self.repeats}) at {self.shape}"
        if flops_ratio is None:
            return speed
        speed += f"; FLOPs {flops_ratio:.2f}x"
        if flops_ratio < 0.9 and self.ratio > 0.95:
            speed += (" (the rewrite removes FLOPs but not time on this runtime: the remaining ops, or the kernels "
                      "that replace them, are not faster here)")
        return speed


class TaskMetric(BaseModel):
    """A task metric measured outside the pipeline on the original and the rewritten model."""

    name: str
    before: float
    after: float
    higher_is_better: bool = True
    note: str = ""
    """How it was measured (data, runtime)."""

    @property
    def delta(self) -> float:
        return self.after - self.before


class Report(BaseModel):
    """What a compile did: cost before and after, one record per pass, exports, latency and notes."""

    model: str
    before: Cost
    after: Cost
    passes: list[PassRecord] = Field(default_factory=list)
    fidelity: Fidelity | None = None
    calibration: str = ""
    exports: list[ExportRecord] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    """Task metrics measured outside the pipeline (e.g. STS-B Spearman before/after)."""
    tasks: list[TaskMetric] = Field(default_factory=list)
    """The same task metrics as before/after pairs, for the summary table."""
    latency: LatencyRecord | None = None

    def add_task_metric(self, name: str, before: float, after: float, *, key: str | None = None,
                        higher_is_better: bool = True, note: str = "") -> None:
        """Record a task metric before and after (also as `metrics[key_original/_rewritten]`)."""
        self.tasks.append(TaskMetric(name=name, before=before, after=after, higher_is_better=higher_is_better, note=note))
        if key:
            self.metrics[f"{key}_original"] = round(before, 3)
            self.metrics[f"{key}_rewritten"] = round(after, 3)

    def summary_rows(self) -> list[list[str]]:
        """The main table: before, after and change of size, compute, measured speed and task metrics."""
        rows = [["", "before", "after", "change"],
                ["params", _n(self.before.params), _n(self.after.params), _x(self.after.params, self.before.params)],
                ["FLOPs (example inputs)", _n(self.before.flops), _n(self.after.flops), _x(self.after.flops, self.before.flops)],
                ["weights MB", f"{self.before.weight_mb:.2f}", f"{self.after.weight_mb:.2f}",
                 _x(self.after.weight_bytes, self.before.weight_bytes)]]
        if self.latency is not None:
            lat = self.latency
            rows.append([f"{lat.runtime} latency ms", _ms(lat.before_ms), _ms(lat.after_ms), f"{lat.ratio:.2f}x"])
        for t in self.tasks:
            rows.append([t.name, f"{t.before:.2f}", f"{t.after:.2f}", f"{t.delta:+.2f}"])
        if self.fidelity is not None:
            rows.append(["output cosine (held back)", "1.000000", f"{self.fidelity.cosine:.6f}", f"{self.fidelity.cosine - 1:+.2e}"])
        return rows

    def explanations(self) -> list[str]:
        """Plain sentences for the measured numbers: speed vs FLOPs, what cosine / rel err mean."""
        out = [f"{t.name}: {t.before:.2f} -> {t.after:.2f} ({t.delta:+.2f}{'' if t.higher_is_better else ', lower is better'})"
               + (f", {t.note}" if t.note else "") + "." for t in self.tasks]
        if self.latency is not None:
            out.append(self.latency.verdict(self.after.flops / self.before.flops if self.before.flops else None) + ".")
        if self.fidelity is not None:
            out.append("cosine / rel err: how close the rewritten model's outputs are to the original's on held-back "
                       "calibration samples (cosine 1 and rel err 0 = identical; rel err is the largest difference "
                       "relative to the largest output value).")
        return out

    # -- rendering ---------------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        """The main table: one row for the original, one per pass, with cost and fidelity columns."""
        head = ["step", "params", "FLOPs", "weights MB", "cosine", "rel err", "time s"]
        rows = [head, ["original", _n(self.before.params), _n(self.before.flops), f"{self.before.weight_mb:.2f}", "1.000000", "0", "-"]]
        for p in self.passes:
            f = p.fidelity
            rows.append([
                p.name, _n(p.cost.params), _n(p.cost.flops), f"{p.cost.weight_mb:.2f}",
                f"{f.cosine:.6f}" if f else "n/a", f"{f.rel_error:.2e}" if f else "n/a", f"{p.seconds:.1f}",
            ])
        rows.append(["total (after/before)", _r(self.after.params, self.before.params), _r(self.after.flops, self.before.flops),
                     _r(self.after.weight_bytes, self.before.weight_bytes),
                     f"{self.fidelity.cosine:.6f}" if self.fidelity else "n/a",
                     f"{self.fidelity.rel_error:.2e}" if self.fidelity else "n/a",
                     f"{sum(p.seconds for p in self.passes):.1f}"])
        return rows

    def to_table(self) -> str:
        """A plain-text table for the terminal: the summary, the per-pass table, then prose."""
        lines = [f"rewrite report: {self.model}"]
        lines += _text_table(self.summary_rows(), rules=(0,))
        lines.append("")
        rows = self.rows()
        lines += _text_table(rows, rules=(0, len(rows) - 2))
        lines += self._prose(markdown=False)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The report as Markdown (the `report.md` the CLI writes)."""
        rows = self.rows()
        out = [f"# rewrite report: {self.model}", ""]
        if self.calibration:
            out += [f"Calibration: {self.calibration}", ""]
        summary = self.summary_rows()
        out.append("| " + " | ".join(summary[0]) + " |")
        out.append("|---|---:|---:|---:|")
        out += ["| " + " | ".join(r) + " |" for r in summary[1:]]
        out += ["", "## Passes", ""]
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|")
        for r in rows[1:]:
            out.append("| " + " | ".join(r) + " |")
        out.append("")
        out += self._prose(markdown=True)
        for p in self.passes:
            if p.details:
                out += ["", f"## {p.name}", ""]
                out += _details_markdown(p.details)
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        """The report as JSON (every field, for tools)."""
        return self.model_dump_json(indent=2)

    def _prose(self, markdown: bool) -> list[str]:
        bullet = "- " if markdown else "  * "
        out = []
        for p in self.passes:
            for line in ([p.summary] if p.summary else []) + p.notes:
                out.append(f"{bullet}{p.name}: {line}")
        for e in self.exports:
            status = "verified" if e.verified else "NOT verified"
            out.append(f"{bullet}export {e.backend}: {e.path} ({e.bytes / 1e6:.2f} MB), {status}. {e.verdict()}")
            out += [f"{bullet}export {e.backend}: {n}" for n in e.notes]
        out += self._overfit_lines(bullet)
        out += [f"{bullet}{line}" for line in self.explanations()]
        if not self.tasks:  # metrics recorded as pairs are in the summary table already
            out += [f"{bullet}{k}: {v}" for k, v in self.metrics.items()]
        out += [f"{bullet}warning: {w}" for w in self.warnings]
        return out

    def _overfit_lines(self, bullet: str) -> list[str]:
        """Per pass: output cosine on calibration batches next to held-back batches (over-fitting shows as a gap)."""
        out = []
        for p in self.passes:
            if p.fidelity is not None and p.fidelity_calibration is not None:
                gap = p.fidelity_calibration.cosine - p.fidelity.cosine
                out.append(f"{bullet}{p.name}: cosine {p.fidelity_calibration.cosine:.6f} on calibration batches, "
                           f"{p.fidelity.cosine:.6f} on held-back batches"
                           + (f" (gap {gap:.2e}: the fit may be over-fitting)" if gap > 1e-3 else ""))
        return out

    def __str__(self) -> str:
        return self.to_table()


def _n(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _r(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _ms(ms: float) -> str:
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def _x(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


def _text_table(rows: list[list[str]], rules: tuple[int, ...] = (0,)) -> list[str]:
    """Aligned columns (first left, the rest right) with a rule under the given rows."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i in rules:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _details_markdown(details: dict[str, Any]) -> list[str]:
    out = []
    for key, value in details.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            cols = list(value[0].keys())
            out += [f"**{key}**", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
            for row in value:
                out.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
            out.append("")
        else:
            out.append(f"- **{key}**: {_fmt(value)}")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return ", ".join(_fmt(x) for x in v[:12]) + f", ... ({len(v)} in all)"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)
