"""What the user sees: log levels, a one-line header, the run summary, errors."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .redact import hide_password
from .tracking import ui_command

if TYPE_CHECKING:
    from .records import JobResult, Objective, Outcome, SweepOutcome

def _console(stderr: bool) -> Console:
    """A terminal's own width; piped (a log file, CI, another program), lines are not cut
    at Rich's 80 columns: plain text goes unwrapped, tables get 120 columns (or $COLUMNS)."""
    found = Console(stderr=stderr, highlight=False)
    if found.is_terminal or os.environ.get("COLUMNS"):
        return found
    return Console(stderr=stderr, highlight=False, width=120, soft_wrap=True)


console = _console(stderr=False)
errors = _console(stderr=True)

_QUIET = ("kedro", "py.warnings", "mlflow", "alembic", "optuna")


def setup_logging(verbose: bool) -> None:
    """kmrun's lines always; Kedro's node-by-node lines only when verbose."""
    level = logging.INFO if verbose else logging.WARNING
    for name in _QUIET:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("runner").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@contextmanager
def quiet_unless(verbose: bool) -> Iterator[None]:
    """Hold back INFO records (from any logger: Kedro's node-by-node log) for the block,
    unless verbose; whatever was silenced before stays so."""
    if verbose:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))
    try:
        yield
    finally:
        logging.disable(previous)


def header(experiment: str, pipeline: str, env: str, tags: list[str], uri: str) -> None:
    tagged = f" · tags {','.join(tags)}" if tags else ""
    console.print(f"[bold]kmrun {__version__}[/] · {experiment} · pipeline {pipeline} · env {env}{tagged}\n"
                  f"  store {hide_password(uri)}")


def run_summary(result: JobResult, run_name: str | None, objective: Objective, uri: str, experiment: str) -> None:
    style = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow"}.get(result.status, "")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("run", f"{run_name or ''} {result.run_id}".strip())
    table.add_row("status", f"[{style}]{result.status}[/]")
    if result.objective is not None:
        metric = objective.metrics[0] if len(objective.metrics) == 1 else objective.metrics
        direction = objective.directions[0] if len(objective.directions) == 1 else objective.directions
        table.add_row("objective", f"{metric} = {result.objective}  ({direction})")
    for name, value in sorted(result.metrics.items()):
        table.add_row(f"  {name}", f"{value:.6g}")
    if result.cached:
        sources = ", ".join(sorted({run[:12] for run in result.cached.values()}))
        table.add_row("cache", f"{', '.join(result.cached)} from the node cache (computed by run {sources})")
    table.add_row("store", f"{hide_password(uri)}  (experiment '{experiment}')")
    table.add_row("ui", ui_command(uri))
    console.print(table)


def error(message: str, hint: str | None = None) -> None:
    errors.print(f"[bold red]Error:[/] {escape(message)}", markup=True, soft_wrap=True)
    if hint:
        errors.print(hint, soft_wrap=True, markup=False)


def warn(message: str) -> None:
    """A warning: on stderr, in yellow, not an error (the command goes on)."""
    errors.print(f"[bold yellow]Warning:[/] {escape(message)}", markup=True, soft_wrap=True)


def say(message: str) -> None:
    console.print(message, markup=False)


def cache_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    """``kmrun cache``: one row per entry, columns as wide as their longest value."""
    if not rows:
        return
    table = Table(box=None, show_header=True, header_style="bold")
    for name, justify in (("node", "left"), ("size", "right"), ("created", "left"), ("run", "left"), ("key", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)


def models_table(rows: list[dict[str, Any]], metric: str) -> None:
    """``kmrun models``: one row per registered model version."""
    table = Table(box=None, pad_edge=False)
    for name, justify in (("name", "left"), ("version", "right"), ("aliases", "left"), (metric, "right"),
                          ("run", "left")):
        table.add_column(name, justify=justify, no_wrap=name in ("run", "version"))  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["name"], str(r["version"]), r["aliases"],
                      "" if r["metric"] is None else format(r["metric"], ".4g"), r["run_id"])
    console.print(table)


TABLE_ROWS = 1000  # a longer listing is plain lines: a table lays every row out in memory first


def dry_run(outcome: SweepOutcome) -> None:
    console.print(f"Dry run: {len(outcome.outcomes)} job(s). Nothing was run or recorded.")
    if len(outcome.outcomes) > TABLE_ROWS:
        width = len(str(outcome.outcomes[-1].index))
        for start in range(0, len(outcome.outcomes), TABLE_ROWS):  # written as it goes, not laid out
            console.file.write("".join(f"{job.index:>{width}}  {' '.join(job.swept)}\n"
                                       for job in outcome.outcomes[start:start + TABLE_ROWS]))
        return
    table = Table(box=None)
    table.add_column("#", justify="right")
    table.add_column("overrides")
    for job in outcome.outcomes:
        table.add_row(str(job.index), " ".join(job.swept))
    console.print(table)


class SweepProgress:
    """A progress bar: done/total, failed, best so far, ETA."""

    def __init__(self, total: int, objective: Objective, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.metric, self.direction = objective.primary
        self.failed = self.pruned = 0
        self.best: float | None = None
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("pruned {task.fields[pruned]}"),
            TextColumn("best {task.fields[best]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, failed=0, pruned=0, best="-")

    def update(self, cell: Outcome, advance: int = 1) -> None:
        self.failed += cell.status == "FAILED"
        self.pruned += cell.status == "PRUNED"
        value = cell.score()
        if value is not None and (
            self.best is None or (value > self.best if self.direction == "maximize" else value < self.best)
        ):
            self.best = value
        best = f"{self.metric}={self.best:.4g}" if self.best is not None else "-"
        self.progress.update(self.task, advance=advance, failed=self.failed, pruned=self.pruned, best=best)
        if not console.is_terminal:
            console.print(f"  {escape(f'[{cell.status}]')} {escape(cell.label)}  {self.metric}={_short(value)}")

    def __enter__(self) -> SweepProgress:
        if console.is_terminal:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def sweep_summary(outcome: SweepOutcome) -> None:
    """The grid's table, best first, the counts, and what to do about failures."""
    if outcome.study is not None:
        study_summary(outcome)
        return
    metric, _ = outcome.objective.primary
    table = Table(title="Sweep results, best first")
    table.add_column("#", justify="right")
    table.add_column("cell")
    table.add_column("status")
    table.add_column(str(metric), justify="right")
    table.add_column("run")
    for cell in outcome.ranked():
        style = {"FINISHED": "green", "SKIPPED": "green", "FAILED": "red"}.get(cell.status, "yellow")
        table.add_row(str(cell.index), cell.label, f"[{style}]{cell.status}[/]", _short(cell.score()),
                      (cell.run_id or "")[:12])
    console.print(table)
    n = outcome.counts
    console.print(
        f"{n['jobs_total']} jobs: {n['jobs_finished'] - n['jobs_skipped']} ran and finished, "
        f"{n['jobs_skipped']} skipped, {n['jobs_failed']} failed, {n['jobs_killed']} killed, "
        f"{n['jobs_not_started']} not started."
        + (f" {n['jobs_infeasible']} miss objective.constraints "
           f"({', '.join(str(c) for c in outcome.objective.constraints)}): never the best."
           if n.get("jobs_infeasible") else "")
        + f"\nparent run {outcome.parent_run_id} · store {hide_password(outcome.uri)}\nui: {ui_command(outcome.uri)}"
    )
    if _stopped(outcome):
        return
    failed = [c for c in outcome.outcomes if c.status in ("FAILED", "KILLED", "NOT_STARTED")]
    if failed:
        for cell in failed:
            if cell.error:
                errors.print(f"[red]{cell.status}[/] {escape(cell.label)}: {escape(cell.error.splitlines()[0])}")
        errors.print(
            f"{len(failed)} job(s) did not finish. Fix the cause, then run the same command again; "
            f"finished cells are skipped and only these run:\n  {escape(outcome.command)}"
        )


def _stopped(outcome: SweepOutcome) -> bool:
    """Whether a job's error stopped the sweep (it would repeat in every job): said once."""
    fatal = next((c for c in outcome.outcomes if c.fatal), None)
    if fatal is None or not fatal.error:
        return False
    errors.print(f"[bold red]Stopped:[/] {escape(fatal.label)}: {escape(fatal.error)}\n"
                 "The other jobs would miss it too, so none more was started.")
    return True


def study_summary(outcome: SweepOutcome) -> None:
    """The best trial (or the Pareto set), the counts, and what to do next."""
    study = outcome.study
    assert study is not None
    names = outcome.objective.metrics
    title = "Pareto set" if len(names) > 1 else "Best trial"
    table = Table(title=f"{title} of study '{study.name}'")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(str(name), justify="right")
    table.add_column("params")
    table.add_column("run")
    for trial in study.best:
        values = [f"{v:.6g}" for v in trial.values]
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={_short_value(v)}" for k, v in trial.params.items())
        table.add_row(str(trial.number), *values, params, trial.run_id[:12])
    console.print(table)
    if len(study.by_option) > 1:  # a conditional space: the best of each option too
        console.print("best of each option: " + "; ".join(
            f"{option} {trial.values[0]:.6g} (trial {trial.number})" for option, trial in study.by_option.items()),
            markup=False)
    if study.infeasible:
        rules = ", ".join(str(c) for c in outcome.objective.constraints)
        console.print(f"{study.infeasible} complete trial(s) miss objective.constraints ({rules}): never the best.",
                      markup=False)
    if not study.best and study.infeasible:
        errors.print("No complete trial meets objective.constraints yet: there is no best trial.")
    states = study.states
    complete, pruned, failed = states.get("COMPLETE", 0), states.get("PRUNED", 0), states.get("FAIL", 0)
    console.print(
        f"study '{study.name}': {complete} complete + {pruned} pruned of {study.target} wanted; "
        f"{failed} failed in all. "
        f"This run: {len(outcome.outcomes)} trials.\nparent run {outcome.parent_run_id} · storage "
        f"{study.storage} · store {hide_password(outcome.uri)}\nui: {ui_command(outcome.uri)}"
    )
    running = states.get("RUNNING", 0)
    if running:
        console.print(f"{running} trial(s) still running in other processes.")
    if _stopped(outcome):
        return
    if complete + pruned + running < study.target:
        errors.print(f"The study holds fewer than {study.target} finished trials. To continue:\n  "
                     f"{escape(outcome.command)}")
    if study.best and len(names) == 1:
        if study.exported_to:
            name = study.exported_to.rsplit("/", 1)[-1].removesuffix(".yaml")
            console.print(f"Rerun the best trial: kmrun +experiment={name}", markup=False)
        else:
            best = study.best[0].run_id
            console.print(f"Rerun the best trial: kmrun promote {best} --name best_{study.name} && "
                          f"kmrun +experiment=best_{study.name}", markup=False)


def _short_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


MAX_CELL = 24  # characters a value may take in the runs table; longer ones end in …
SHORT_HEADER = 10  # a header longer than its values is cut from the left to this: …test_size


def print_runs(rows: list[dict[str, Any]], fmt: str, metric: str | None, columns: list[str] | None = None,
               width: int | None = None) -> None:
    """``kmrun runs`` output: a table that fits the terminal (120 columns when piped), or
    csv, md or json for other tools. ``columns`` picks the table's columns by name
    (``name``, ``status``, ``metrics.accuracy``, ``params.model.C``...)."""
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    flat = [_flat_row(r) for r in rows]
    if fmt in ("csv", "md"):
        from .results import to_csv, to_markdown

        names = list(dict.fromkeys(k for r in flat for k in r))
        flat = [{c: r.get(c) for c in names} for r in flat]
        sys.stdout.write(to_csv(flat) if fmt == "csv" else to_markdown(flat))
        return
    table_rows = [_table_row(r, rows, metric) for r in rows]
    objective = metric or "objective"
    params = sorted({k for r in table_rows for k in r if k.startswith("params.")})
    with_params = [r for r in table_rows if any(r[k] not in (None, "") for k in r if k.startswith("params.")
                                                and not k.startswith("params.best."))]  # a parent's best.*: not its own
    differ = [k for k in params if len({r.get(k) for r in with_params}) > 1 and not k.startswith("params.best.")]
    # what tells the runs apart first: the params that differ, then when and how they ran
    order = ["name", objective, *differ, "status", "start", "duration", *(k for k in params if k not in differ),
             "run id"]
    order += sorted({k for r in table_rows for k in r if k.startswith("metrics.")} - {f"metrics.{metric}"})
    if columns:
        unknown = [c for c in columns if c not in order and c != "objective"]
        if unknown:
            raise ValueError(f"--columns: no column {', '.join(unknown)}; columns here: {', '.join(order)}")
        order = [objective if c == "objective" else c for c in columns]
    order = [c for c in order if any(r.get(c) not in (None, "") for r in table_rows)]  # never an empty column
    width = width or (console.width if console.is_terminal else int(os.environ.get("COLUMNS", 0) or 120))
    shown: dict[str, str] = {}  # column -> its header, shortened from the left to fit its values
    used = 0
    for column in order:
        cells = min(max(len(str(r.get(column, ""))) for r in table_rows), MAX_CELL)
        header = column.removeprefix("params.").removeprefix("metrics.")
        size = max(cells, min(len(header), SHORT_HEADER))
        if used + size + 2 > width and shown:
            break
        shown[column] = header if len(header) <= size else "…" + header[-(size - 1):]
        used += size + 2
    left = len(order) - len(shown)
    title = f"{len(rows)} run(s)" + (f", objective {metric}" if metric and objective in shown else "")
    table = Table(title=title, box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for header in shown.values():
        table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=MAX_CELL)
    for r in table_rows:
        table.add_row(*(escape(_clip(str(r.get(c, "")))) for c in shown))
    Console(width=width, highlight=False, force_terminal=console.is_terminal).print(table)
    if left:
        console.print(f"{left} more column(s) did not fit: pick with --columns, or use --format csv.", markup=False)


def _table_row(r: dict[str, Any], rows: list[dict[str, Any]], metric: str | None) -> dict[str, str]:
    nested = r["parent_run_id"] and any(o["run_id"] == r["parent_run_id"] for o in rows)
    out = {
        "name": ("└ " if nested else "") + str(r["name"] or ""),
        "status": r["status"],
        "start": r["start"][5:16].replace("T", " "),  # MM-DD HH:MM
        "duration": f"{r['duration_s']}s" if r["duration_s"] is not None else "",
        metric or "objective": _short(r["objective"]) if r["objective"] is not None else "",
        "run id": r["run_id"][:12],
    }
    out.update({f"metrics.{k}": _short(v) for k, v in r["metrics"].items()})
    out.update({f"params.{k}": str(v) for k, v in r["params"].items()})
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _flat_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k not in ("metrics", "params")}
    out.update({f"metrics.{k}": v for k, v in r["metrics"].items()})
    out.update({f"params.{k}": v for k, v in r["params"].items()})
    return out


def show_run(run: Any, artifacts: list[str], config: str | None, reproduce: str) -> None:
    info = run.info
    console.print(f"[bold]{info.run_name}[/] {info.run_id} · {info.status} · experiment {info.experiment_id}")
    for title, data in (("params", run.data.params), ("metrics", run.data.metrics), ("tags", run.data.tags)):
        table = Table(title=title, show_header=False, box=None, title_justify="left")
        for key in sorted(data):
            value = data[key]
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)
    console.print("[bold]artifacts[/]\n  " + ("\n  ".join(artifacts) or "none"))
    if config is not None:
        console.print("[bold]composed config[/] (config.yaml)")
        console.print(config, markup=False)
    console.print(f"[bold]reproduce[/]: {reproduce}")


def metric_diff(original: dict[str, float], new: dict[str, float]) -> None:
    table = Table(title="Metrics against the original run")
    for column in ("metric", "original", "reproduced", "difference"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name in sorted(set(original) | set(new)):
        a, b = original.get(name), new.get(name)
        diff = f"{b - a:+.3g}" if a is not None and b is not None else "-"
        table.add_row(name, _short(a), _short(b), diff)
    console.print(table)
