"""kmrun: declarative YAML experiments for Kedro projects, tracked in MLflow.

Public API (importing this package is cheap and has no side effects; nothing prints
unless ``echo=True``)::

    import runner
    result = runner.run(["+experiment=baseline", "params.model.C=0.5"])
    result.run_id, result.metrics, result.objective

    outcome = runner.sweep(["+experiment=baseline", "params.model.C=0.1,1,10"])
    outcome.best(), outcome.counts, outcome.exit_code

    from runner import report      # inside a Kedro node
    report(val_accuracy, step=epoch)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import JobFailed, KmrunError

if TYPE_CHECKING:
    from .api import run, sweep

__version__ = "0.1.0"
__all__ = ["JobFailed", "KmrunError", "__version__", "report", "run", "sweep"]


def report(value: float, step: int) -> None:
    """Report an intermediate value (say, a validation score per epoch) from a node.

    Logged as a step metric of the current kmrun run. In a study, the trial's pruner
    may stop the node here. Outside a kmrun run, nothing happens, so the node still runs
    under plain ``kedro run``.
    """
    from .fluent import report_step

    report_step(value, step)


def __getattr__(name: str) -> Any:
    if name in ("run", "sweep"):  # the API module imports Hydra; load it on first use
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}; public API: {', '.join(__all__)}")
