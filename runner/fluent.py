"""What a node sees of the job it runs in: the job's run as MLflow's active run (for
kedro-mlflow's datasets and a node's own ``mlflow.log_*`` calls), and ``report_step``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .metrics import is_number
from .trial import report

log = logging.getLogger(__name__)


@contextmanager
def active_run(uri: str, run_id: str) -> Iterator[None]:
    """For the pipeline's duration, this job's run is MLflow's active run, so that
    kedro-mlflow's datasets and a node's own ``mlflow.log_*`` calls land in it. It is left
    RUNNING afterwards: kmrun ends it, with the status the job earned."""
    import mlflow
    from mlflow.tracking._tracking_service import utils  # no public way to set the URI for a while

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also writes it
    try:
        with utils._use_tracking_uri(uri):
            try:
                mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
                started = True
            except Exception as err:  # the job still runs; only fluent logging has no run to go to
                log.warning("Could not make run %s MLflow's active run: %s", run_id, err)
                started = False
            try:
                yield
            finally:
                if started:
                    mlflow.end_run(status="RUNNING")
    finally:
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


_current: dict[str, Any] = {}  # the run ``report_step`` writes to: a process runs one job at a time


def reporting_to(tracker: Any, run_id: str, trial: Any) -> None:
    """From now until ``reporting_done``, ``report_step`` logs to this job's run (and trial)."""
    _current.update(tracker=tracker, run_id=run_id, trial=trial)


def reporting_done() -> None:
    _current.clear()


def report_step(value: float, step: int, name: str = "intermediate") -> None:
    """Log ``value`` at ``step`` on the current job's run and, in a study, report it to
    the trial, raising ``optuna.TrialPruned`` when the pruner stops it. Outside a kmrun
    job, nothing happens."""
    tracker, run_id, trial = _current.get("tracker"), _current.get("run_id"), _current.get("trial")
    if tracker is None or not is_number(value):
        return
    tracker.log_step(run_id, name, float(value), int(step))
    if trial is not None:
        report(trial, float(value), int(step))
