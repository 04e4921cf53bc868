"""The PassManager: validate a whole pipeline first, then run it with instruments.

Validation (before any work; all problems reported together): unknown passes and bad
configs fail while parsing; here: missing data, labels or extras a pass requires, and
broken order constraints.

Instruments, per pass: wall time; node / parameter / byte / MAC deltas; the structural
checker (at the pipeline's boundaries always, after every pass with `verify`); with
`verify`, a numeric check of the model's outputs against the pipeline's input on sample
data: an `exact` pass that moves outputs by more than `tolerance` (relative to each
output's scale) fails; a lossy pass's error is measured and reported. When a pass fails,
the model it got is saved with a reproducer command next to it.

The input model is never modified: the manager works on a clone.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimgraph.errors import DataError, PassError, PipelineError, SlimgraphError
from slimgraph.ir.check import check
from slimgraph.ir.model import Model
from slimgraph.passes import contracts
from slimgraph.passes.base import REQUIREMENTS, Pass, PassContext
from slimgraph.passes.pipeline import FixedPoint, Pipeline, Step, order_violations, parse

logger = logging.getLogger("slimgraph.manager")


@dataclasses.dataclass
class Row:
    """One pass's line in the report."""

    name: str
    modified: bool
    seconds: float
    nodes: tuple[int, int]
    params: tuple[int, int]
    bytes: tuple[int, int]
    macs: tuple[int, int]
    #: worst output error relative to output scale vs the pipeline input (None: not verified)
    error: float | None = None
    exact: bool = True
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    rows: list[Row]
    pipeline: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"pipeline": self.pipeline, "seconds": self.seconds, "passes": [dataclasses.asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        head = "| pass | changed | time (s) | nodes | params | bytes | MACs | max rel. error | stats |\n"
        head += "|---|---|---:|---|---|---|---|---:|---|\n"
        lines = []
        for r in self.rows:
            err = "" if r.error is None else f"{r.error:.2e}"
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()
                              if k != TABLE and not k.startswith("_") and v not in (0, {}, None, []))
            lines.append(
                f"| {r.name} | {'yes' if r.modified else 'no'} | {r.seconds:.3f} | {_delta(r.nodes)} | "
                f"{_delta(r.params)} | {_delta(r.bytes)} | {_delta(r.macs)} | {err} | {stats} |"
            )
        text = f"Pipeline: `{self.pipeline}` ({self.seconds:.2f} s)\n\n" + head + "\n".join(lines) + "\n"
        for r in self.rows:
            if r.stats.get(TABLE):
                text += f"\n## {r.name}: per layer\n\n" + _table_markdown(r.stats[TABLE]) + "\n"
        return text

    def to_rich(self, *, changed_only: bool = False):
        """A rich table; `changed_only` hides passes that left the model as it was."""
        from rich.table import Table

        rows = [r for r in self.rows if r.modified or not changed_only]
        hidden = len(self.rows) - len(rows)
        caption = f"{hidden} pass runs changed nothing (hidden)" if hidden else None
        t = Table(title=f"{len(self.rows)} pass runs in {self.seconds:.2f} s", caption=caption)
        t.add_column("pass", no_wrap=True)
        for col in ("changed", "time (s)", "nodes", "params", "bytes", "MACs", "max rel. err"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(r.name, "yes" if r.modified else "-", f"{r.seconds:.3f}", _delta(r.nodes),
                      _delta(r.params), _delta(r.bytes), _delta(r.macs),
                      "" if r.error is None else f"{r.error:.1e}")
        return t


#: A pass's stats may hold a per-layer table under this key (a list of dicts with the same
#: keys, e.g. name / channels before / channels after / MACs): the markdown report renders it.
TABLE = "table"


def _table_markdown(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(row.get(h, "")) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def _delta(pair: tuple[int, int]) -> str:
    a, b = pair
    return f"{a}" if a == b else f"{a} -> {b}"


@dataclasses.dataclass
class RunResult:
    model: Model
    report: Report


def _metrics(model: Model, with_macs: bool) -> tuple[int, int, int, int]:
    p = model.analysis("params")
    macs = sum(model.analysis("macs").values()) if with_macs else 0
    return sum(1 for _ in model.nodes(recursive=True)), p["params"], p["bytes"], macs


class PassManager:
    """Runs a pipeline; see module docstring."""

    def __init__(
        self,
        pipeline: Any,
        *,
        verify: bool = False,
        tolerance: float = 1e-5,
        verify_samples: int = 4,
        macs: bool = True,
        dump_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.pipeline: Pipeline = parse(pipeline)
        self.verify = verify
        self.tolerance = tolerance
        self.verify_samples = verify_samples
        self.macs = macs
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.progress = progress

    # -- validation ----------------------------------------------------------------------
    def validate(self, ctx: PassContext) -> None:
        passes = list(self.pipeline.passes())
        if not passes:
            raise PipelineError("the pipeline has no passes")
        problems = []
        for p in passes:
            for req in p.requires:
                check_fn = REQUIREMENTS.get(req)
                missing = check_fn(ctx) if check_fn else f"unknown requirement {req!r}"
                if missing:
                    problems.append(f"pass {p.name!r} needs {missing}")
        problems += order_violations(passes)
        if problems:
            raise PipelineError("invalid pipeline: " + "; ".join(dict.fromkeys(problems)))

    # -- running ---------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext | None = None) -> RunResult:
        ctx = ctx or PassContext()
        if ctx.input_model is None:  # what `train.distill(teacher: input)` reads
            ctx = dataclasses.replace(ctx, input_model=model)
        self.validate(ctx)
        start = time.perf_counter()
        work = model.clone()
        check(work, where="pipeline input")
        reference = self._reference(work, ctx) if self.verify else None
        rows: list[Row] = []
        progress = _Progress(len(list(self.pipeline.passes())), enabled=self.progress and ctx.progress)
        with progress:
            for step in self.pipeline.steps:
                self._run_step(step, work, ctx, reference, rows, progress)
        check(work, where="pipeline output")
        report = Report(rows, str(self.pipeline), time.perf_counter() - start)
        return RunResult(work, report)

    def _run_step(self, step: Step, model: Model, ctx, reference, rows, progress) -> bool:
        if isinstance(step, FixedPoint):
            any_modified = False
            for iteration in range(step.max_iterations):
                changed = [self._run_step(s, model, ctx, reference, rows, progress) for s in step.steps]
                any_modified |= any(changed)
                if not any(changed):
                    break
                progress.extend(len(step.steps))
            else:
                logger.warning("fixed point not reached after %d iterations", step.max_iterations)
            return any_modified
        return self._run_pass(step, model, ctx, reference, rows, progress)

    def _run_pass(self, p: Pass, model: Model, ctx, reference, rows, progress) -> bool:
        progress.describe(p.name)
        before = _metrics(model, self.macs)
        snapshot = model.clone() if self._keeps_snapshots else None
        t0 = time.perf_counter()
        try:
            result = p(model, ctx)
            if result.model is not model:  # passes may return a new Model; adopt it in place
                model.ir, model.version = result.model.ir, result.model.version
            if self.verify:
                check(model, where=f"after pass {p.name!r}")
            broken = contracts.check(model) if result.modified else []
            if broken:
                raise PassError(p.name, "; ".join(broken))
        except SlimgraphError as e:
            if e.exit_code == 2 and not isinstance(e, PassError):
                # Bad input found by a pass (data that does not fit, an op it cannot take):
                # keep the type, so the CLI still exits 2, and name the pass.
                raise type(e)(f"pass {p.name!r}: {e}") from e
            raise self._failed(p, snapshot, e) from e
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
            # A bug in the pass: keep the traceback chained, add the reproducer.
            raise self._failed(p, snapshot, e) from e
        seconds = time.perf_counter() - t0
        after = _metrics(model, self.macs) if result.modified else before
        error = None
        if reference is not None and result.modified:
            error = self._error(model, reference)
            if p.exact and error > self.tolerance:
                raise self._failed(p, snapshot, PassError(
                    p.name, f"declared exact, but moved the outputs by {error:.2e} relative "
                    f"(tolerance {self.tolerance:.0e})"))
        rows.append(Row(p.name, result.modified, seconds, (before[0], after[0]), (before[1], after[1]),
                        (before[2], after[2]), (before[3], after[3]), error, p.exact, result.stats))
        progress.advance()
        return result.modified

    @property
    def _keeps_snapshots(self) -> bool:
        return self.verify or self.dump_dir is not None

    # -- verification ---------------------------------------------------------------------
    def _reference(self, model: Model, ctx: PassContext) -> tuple[list[dict], list[dict]]:
        from slimgraph import data as sgdata

        generated = not ctx.data
        feeds_all = sgdata.generate(model, self.verify_samples, seed=ctx.seed) if generated else ctx.data
        ranks = sgdata.input_ranks(model)
        n = min(self.verify_samples, sgdata.count(feeds_all))
        feeds = [sgdata.sample(feeds_all, ranks, i) for i in range(n)]
        try:
            return feeds, [_run_reference(model, f) for f in feeds]
        except SlimgraphError as e:  # ORT refused the feeds or failed while running
            if not generated:
                raise
            raise DataError(
                f"verification needs real inputs for this model: inputs generated from its declared "
                f"shapes (dynamic dims = 1) fail ({e}); pass --data D.npz or --shape NAME=DIMS"
            ) from None

    def _error(self, model: Model, reference) -> float:
        from slimgraph.compare import diff_all, worst_rel

        feeds, expected = reference
        worst = 0.0
        for f, ref in zip(feeds, expected):
            worst = max(worst, worst_rel(diff_all(ref, _run_reference(model, f))))
        return worst

    # -- failures ----------------------------------------------------------------------------
    def _failed(self, p: Pass, snapshot: Model | None, error: Exception) -> PassError:
        where = ""
        if snapshot is not None:
            folder = self.dump_dir or Path(tempfile.mkdtemp(prefix=f"slimgraph-{p.name}-"))
            where = "; " + _write_reproducer(folder, p, snapshot)
        message = str(error)
        if isinstance(error, PassError):
            message = message.split(": ", 1)[1] if message.startswith(f"pass {p.name!r}") else message
        elif not isinstance(error, SlimgraphError):
            message = f"internal error {type(error).__name__}: {error}"
        return PassError(p.name, message + where)


def _run_reference(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from slimgraph.backends import ort

    return ort.run(ort.session(model, optimization="disable"), feeds)


def _write_reproducer(folder: Path, p: Pass, model: Model) -> str:
    from slimgraph.ir.io import save

    folder.mkdir(parents=True, exist_ok=True)
    model_path = save(model, folder / f"{p.name}.input.onnx")
    (folder / f"{p.name}.input.txt").write_text(_text(model))
    spec = f"{p!r}".replace(" ", "")
    cmd = f"slimgraph run {shlex.quote(str(model_path))} -p {shlex.quote(spec)} -o /tmp/out.onnx --verify --debug"
    (folder / "reproduce.sh").write_text("#!/bin/sh\n" + cmd + "\n")
    return f"input saved to {model_path}; reproduce with: {cmd}"


def _text(model: Model) -> str:
    import onnx_ir as ir

    try:
        return ir.to_onnx_text(model.ir)
    except (ValueError, TypeError) as e:  # text printer gaps for exotic types
        return f"(could not print the model as text: {e})"


class _Progress:
    """A rich progress bar over passes, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("passes", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def describe(self, name: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"pass {name}")

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def extend(self, n: int) -> None:
        if self._bar is not None:
            self.total += n
            self._bar.update(self._task, total=self.total)


def run(model: Any, pipeline: Any, *, data: Mapping[str, np.ndarray] | None = None, labels=None,
        verify: bool = False, seed: int = 0, progress: bool = False,
        options: Mapping[str, Any] | None = None, **manager_options: Any) -> RunResult:
    """Load `model` if needed, run `pipeline` on a copy, return the new model and a report.

    `options` reach the passes as `PassContext.options` (e.g. `{"metric": fn}` for
    `quantize.mixed_precision`); other keywords configure the `PassManager`."""
    from slimgraph.ir.io import load

    m = load(model)
    ctx = PassContext(data=data, labels=labels, seed=seed, progress=progress, options=dict(options or {}))
    return PassManager(pipeline, verify=verify, progress=progress, **manager_options).run(m, ctx)
