"""The one job loop, for grids and studies alike.

A ``Source`` decides *what* runs next (a grid's cells, or Optuna's ask and tell); a
``Scheduler`` decides *where* it runs; the loop knows neither's internals. It takes the
next job whenever a slot is free (no batch barrier), records each result as soon as it
is back, and stops launching under one failure policy. A parent MLflow run is a
context manager around the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import KmrunBug, KmrunError, WorkerLost
from .records import JobResult, Outcome, Status

if TYPE_CHECKING:
    from .job import JobSpec
    from .scheduler import Scheduler
    from .tracking import Tracker


@dataclass
class Job:
    """A job a source hands out: what to run, and where its outcome goes."""

    spec: JobSpec
    outcome: Outcome
    token: Any = None  # the source's own handle (an Optuna trial)


class Source(Protocol):
    """Where jobs come from."""

    @property
    def planned(self) -> int:
        """Jobs this invocation means to run (the failure policy's base)."""

    def next(self) -> Job | None:
        """The next job to start now, or None when there is none to start now."""

    def exhausted(self) -> bool:
        """With nothing running here: whether no job will ever come."""

    def wait_outside(self) -> None:
        """Nothing runs here, yet jobs may still come (other processes' trials): wait a bit."""

    def record(self, job: Job, result: JobResult) -> None:
        """A job ended: take its result."""

    def abandon(self, job: Job) -> None:
        """A running job was interrupted."""


class FailurePolicy:
    """Stop launching new jobs once ``limit`` jobs have failed.

    ``max_failures`` N ≥ 1 is a count; a value below 1 is a fraction of the jobs
    planned (at least one); None allows as many failures as jobs planned."""

    def __init__(self, max_failures: float | None, planned: int) -> None:
        if max_failures is None:
            self.limit = max(planned, 1)
        elif max_failures >= 1:
            self.limit = int(max_failures)
        else:
            self.limit = max(1, math.ceil(max_failures * planned))
        self.failures = 0

    def count(self, outcome: Outcome) -> None:
        self.failures += outcome.status is Status.FAILED
        if outcome.fatal:  # every other job would fail the same way: stop now
            self.failures = max(self.failures, self.limit)

    @property
    def exceeded(self) -> bool:
        return self.failures >= self.limit


def drive(source: Source, scheduler: Scheduler, policy: FailurePolicy,
          on_outcome: Callable[[Outcome], None] | None = None) -> None:
    """Run the source's jobs on the scheduler until the source is exhausted or the policy
    stops it. On Ctrl-C, running jobs are abandoned and the interrupt propagates."""
    running: dict[Future[JobResult], Job] = {}
    try:
        while True:
            while len(running) < scheduler.size and not policy.exceeded:
                job = source.next()
                if job is None:
                    break
                try:
                    future = scheduler.submit(job.spec)  # inline, the job runs right here
                except KeyboardInterrupt:
                    source.abandon(job)
                    raise
                running[future] = job
            if not running:
                if policy.exceeded or source.exhausted():
                    return
                source.wait_outside()
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                source.record(job, _result(future))
                if job.outcome.status is Status.NOT_STARTED:
                    continue  # the source queued it again (its worker died)
                policy.count(job.outcome)
                if on_outcome is not None:
                    on_outcome(job.outcome)
    except KeyboardInterrupt:
        for job in running.values():
            source.abandon(job)
        raise


def _result(future: Future[JobResult]) -> JobResult:
    """The job's result; a job whose worker raised or died is FAILED, and the sweep goes on."""
    try:
        return future.result()
    except KeyboardInterrupt:
        raise
    except BrokenProcessPool as err:
        return JobResult("", Status.FAILED, {}, None, WorkerLost(f"The worker process running this job died: {err}"))
    except KmrunError as err:
        return JobResult("", Status.FAILED, {}, None, err)
    except Exception as err:
        return JobResult("", Status.FAILED, {}, None, KmrunBug(f"kmrun bug: {type(err).__name__}: {err}"))


@dataclass
class Parent:
    """A sweep's parent run while it is open; ``status`` is what it ends with."""

    run_id: str
    status: str = "KILLED"


@contextmanager
def parent_run(tracker: Tracker, run_id: str) -> Iterator[Parent]:
    """End the parent run on every path: the status the block set, FAILED if it raised,
    KILLED on Ctrl-C."""
    parent = Parent(run_id)
    try:
        yield parent
    except KeyboardInterrupt:
        parent.status = "KILLED"
        raise
    except BaseException:
        parent.status = "FAILED"
        raise
    finally:
        tracker.finish(run_id, parent.status)
