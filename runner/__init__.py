"""kmrun: declarative YAML experiments for Kedro projects, tracked in MLflow.

Public API (importing this package is cheap and has no side effects)::

    import runner
    result = runner.run(["+experiment=baseline", "params.model.C=0.5"])
    result.run_id, result.metrics, result.objective

    from runner import report      # inside a Kedro node
    report(val_accuracy, step=epoch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import KmrunError

if TYPE_CHECKING:
    from .job import JobResult

__version__ = "0.1.0"
__all__ = ["KmrunError", "__version__", "report", "run"]


def run(overrides: list[str] | None = None) -> JobResult:
    """Run one experiment, as ``kmrun OVERRIDES...`` would, and return its result.

    Raises ``KmrunError`` for bad input (nothing is run) and ``JobFailed`` when the
    pipeline fails (its MLflow run is FAILED).
    """
    from .cli import run_once

    return run_once(list(overrides or []))


def report(value: float, step: int) -> None:
    """Report an intermediate value (say, a validation score per epoch) from a node.

    Logged as a step metric of the current kmrun run. Outside a kmrun run, nothing
    happens, so the node still runs under plain ``kedro run``.
    """
    from .job import report_step

    report_step(value, step)


def __getattr__(name: str) -> Any:  # pragma: no cover - a clear message for typos
    raise AttributeError(f"module 'runner' has no attribute {name!r}; public API: {', '.join(__all__)}")
