"""What the user sees: log levels, a one-line header, the run summary, errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from . import __version__
from .tracking import ui_command

if TYPE_CHECKING:
    from .job import JobResult, JobSpec

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False)

_QUIET = ("kedro", "py.warnings", "mlflow", "alembic", "optuna")


def setup_logging(verbose: bool) -> None:
    """kmrun's lines always; Kedro's node-by-node lines only when verbose."""
    level = logging.INFO if verbose else logging.WARNING
    for name in _QUIET:
        logging.getLogger(name).setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@contextmanager
def quiet_unless(verbose: bool) -> Iterator[None]:
    """Silence INFO records (from any logger) for the block, unless verbose."""
    if verbose:
        yield
        return
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def header(spec: JobSpec, env: str) -> None:
    kedro = spec.conf.kedro
    tags = f" · tags {','.join(kedro.tags)}" if kedro.tags else ""
    console.print(
        f"[bold]kmrun {__version__}[/] · {spec.experiment_name} · pipeline {kedro.pipeline} · "
        f"env {env}{tags}\n  store {spec.uri}"
    )


def run_summary(spec: JobSpec, result: JobResult) -> None:
    style = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow"}.get(result.status, "")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("run", f"{spec.run_name or ''} {result.run_id}".strip())
    table.add_row("status", f"[{style}]{result.status}[/]")
    if result.objective is not None:
        metric = spec.conf.objective.metric
        table.add_row("objective", f"{metric} = {result.objective}  ({spec.conf.objective.direction})")
    for name, value in sorted(result.metrics.items()):
        table.add_row(f"  {name}", f"{value:.6g}")
    table.add_row("store", f"{spec.uri}  (experiment '{spec.experiment_name}')")
    table.add_row("ui", ui_command(spec.uri))
    console.print(table)


def error(message: str, hint: str | None = None) -> None:
    errors.print(f"[bold red]Error:[/] {message}", markup=True, soft_wrap=True)
    if hint:
        errors.print(hint, soft_wrap=True)
