"""Where jobs run: the one seam between deciding what to run and running it.

``Pool.submit(spec)`` takes a ``JobSpec`` (plain data) and returns a future of its
``JobResult``. Inline for one job at a time, else in worker processes. A pool of remote
workers (a shared PostgreSQL store, many machines) would be another class with the same
two methods; nothing else would change.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor

from . import terminal
from .job import JobResult, JobSpec, execute


class Pool:
    """Where jobs run: inline for one at a time, else in worker processes.

    Workers are forked where the OS allows it: they start at once and inherit the
    bootstrapped Kedro project, so each job costs what it costs in-process. A worker
    drops the database connections it inherited before its first job (SQLAlchemy's
    rule for forked processes); MLflow's run state is never shared, since kmrun uses
    no fluent "active run". Elsewhere, workers are spawned and bootstrap once each.
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._executor: ProcessPoolExecutor | None = None
        if self.size > 1:
            import multiprocessing

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._executor = ProcessPoolExecutor(
                self.size,
                mp_context=multiprocessing.get_context(method),
                initializer=_worker_init,
                initargs=(terminal.VERBOSE,),
            )

    def submit(self, spec: JobSpec) -> Future[JobResult]:
        if self._executor is not None:
            return self._executor.submit(execute, spec)
        future: Future[JobResult] = Future()
        future.set_result(execute(spec))
        return future

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self._executor is None:
            return
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            # Workers get SIGINT too on Ctrl-C, but not on SIGTERM sent to this process:
            # tell them, so each ends its run KILLED instead of finishing the job first.
            import multiprocessing
            import signal

            for child in multiprocessing.active_children():
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGINT)
        self._executor.shutdown(wait=True, cancel_futures=True)


def _worker_init(verbose: bool) -> None:
    import signal

    signal.signal(signal.SIGINT, _worker_interrupt)
    signal.signal(signal.SIGTERM, _worker_interrupt)
    if not verbose:
        logging.disable(logging.INFO)
    store = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    engines = getattr(getattr(store, "SqlAlchemyStore", None), "_engine_map", {})
    for engine in engines.values():
        engine.dispose(close=False)


def _worker_interrupt(signum: int, frame: object) -> None:
    """Once: the running job ends its run KILLED; further signals must not cut that short."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt
