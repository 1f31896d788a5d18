"""One error base. The CLI catches ``KmrunError`` once, prints it and exits with its code.

Bad input (2) is the user's to fix; a failed pipeline (1) is the project's; a bug in
kmrun (3) is ours, and is always shown with its traceback.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class KmrunError(Exception):
    """Bad input or set-up: a message for the user, shown without a traceback."""

    exit_code = 2


class ConfigError(KmrunError):
    """kmrun's own config: unknown keys, wrong types, YAML or Hydra composition errors."""


class ParamError(KmrunError):
    """An override under ``params`` that does not fit the Kedro project's parameters."""


class ProjectError(KmrunError):
    """The Kedro project: not found, unknown pipeline, unknown environment, unreadable credentials."""


class TrackingError(KmrunError):
    """The MLflow store or the Optuna storage: bad URI, unreachable or unwritable."""


class StoreUnavailable(TrackingError):
    """The MLflow store or the Optuna storage stopped answering and stayed away longer
    than ``store_patience``."""


class MetricError(KmrunError):
    """The objective metric is missing or not a finite number."""


class ObjectiveMissing(MetricError):
    """The pipeline did not produce the objective metric: every other job would miss it too."""


class ModelError(KmrunError):
    """The model could not be saved: its job ends FAILED with this message."""


class JobFailed(KmrunError):
    """A job's pipeline raised. Its run is FAILED, with the traceback as an artifact."""

    exit_code = 1


class WorkerLost(KmrunError):
    """The worker process running a job died (killed, out of memory): the job did not fail
    on its own. A grid runs such a cell again, once."""

    exit_code = 1


class KmrunBug(KmrunError):
    """An error in kmrun's own code, not in the pipeline or the input. Please report it."""

    exit_code = 3


def after(step: str, value: T | None) -> T:
    """``value``, which ``step`` sets: an object's attribute read before its step ran is a bug."""
    if value is None:
        raise KmrunBug(f"{step} must come first")
    return value
