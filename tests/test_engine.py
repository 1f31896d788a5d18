"""The job loop with a scripted source and scheduler: no processes, no stores."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from runner.engine import FailurePolicy, Job, drive
from runner.errors import JobFailed
from runner.records import JobResult, Outcome, Status


class Scripted:
    """A source of ``n`` jobs whose results the test decides."""

    def __init__(self, statuses: list[Status]) -> None:
        self.statuses = statuses
        self.outcomes = [Outcome(i, [f"params.x={i}"]) for i in range(len(statuses))]
        self.planned = len(statuses)
        self._queue = iter(self.outcomes)
        self.abandoned: list[int] = []

    def next(self) -> Job | None:
        outcome = next(self._queue, None)
        return None if outcome is None else Job(spec=outcome.index, outcome=outcome)  # type: ignore[arg-type]

    def exhausted(self) -> bool:
        return True

    def wait_outside(self) -> None:
        raise AssertionError("a grid-like source never waits")

    def record(self, job: Job, result: JobResult) -> None:
        job.outcome.take(result)

    def abandon(self, job: Job) -> None:
        job.outcome.status = Status.KILLED
        self.abandoned.append(job.outcome.index)


class Sched:
    """Runs a job by looking up its scripted status; ``size`` jobs may be pending."""

    def __init__(self, source: Scripted, size: int = 1, interrupt_at: int | None = None, raise_at: int | None = None):
        self.source, self.size, self.interrupt_at, self.raise_at = source, size, interrupt_at, raise_at
        self.submitted: list[int] = []

    def submit(self, index: int) -> Future[JobResult]:
        self.submitted.append(index)
        future: Future[JobResult] = Future()
        if index == self.interrupt_at:
            raise KeyboardInterrupt
        if index == self.raise_at:
            future.set_exception(RuntimeError("worker blew up"))
            return future
        status = self.source.statuses[index]
        error = JobFailed("boom") if status is Status.FAILED else None
        future.set_result(JobResult(f"run{index}", status, {"acc": index / 10}, index / 10, error))
        return future


def test_every_job_runs_once_and_is_recorded_in_order():
    source = Scripted([Status.FINISHED] * 4)
    seen = []
    drive(source, Sched(source, size=2), FailurePolicy(None, 4), seen.append)
    assert [o.status for o in source.outcomes] == [Status.FINISHED] * 4
    assert [o.run_id for o in source.outcomes] == ["run0", "run1", "run2", "run3"]
    assert sorted(o.index for o in seen) == [0, 1, 2, 3]


def test_the_failure_policy_stops_launching_and_leaves_the_rest_not_started():
    source = Scripted([Status.FAILED, Status.FAILED, Status.FINISHED, Status.FINISHED])
    sched = Sched(source)
    drive(source, sched, FailurePolicy(2, 4))
    assert sched.submitted == [0, 1]
    assert [o.status for o in source.outcomes] == [Status.FAILED, Status.FAILED, Status.NOT_STARTED, Status.NOT_STARTED]
    assert source.outcomes[0].error == "boom"


def test_a_worker_that_raises_fails_its_job_and_the_loop_goes_on():
    source = Scripted([Status.FINISHED] * 3)
    drive(source, Sched(source, raise_at=1), FailurePolicy(None, 3))
    assert [o.status for o in source.outcomes] == [Status.FINISHED, Status.FAILED, Status.FINISHED]
    assert "kmrun bug: RuntimeError: worker blew up" in source.outcomes[1].error


def test_an_interrupt_abandons_running_jobs_and_propagates():
    source = Scripted([Status.FINISHED] * 4)
    with pytest.raises(KeyboardInterrupt):
        drive(source, Sched(source, interrupt_at=2), FailurePolicy(None, 4))
    assert [o.status for o in source.outcomes[:2]] == [Status.FINISHED, Status.FINISHED]
    assert source.outcomes[3].status is Status.NOT_STARTED


@pytest.mark.parametrize(
    ("max_failures", "planned", "limit"),
    [(None, 10, 10), (None, 0, 1), (1, 10, 1), (3.0, 10, 3), (0.25, 10, 3), (0.5, 4, 2), (0.01, 10, 1)],
)
def test_failure_policy_limit(max_failures, planned, limit):
    policy = FailurePolicy(max_failures, planned)
    assert policy.limit == limit
    for _ in range(limit - 1):
        policy.count(Outcome(0, [], Status.FAILED))
    assert not policy.exceeded
    policy.count(Outcome(0, [], Status.PRUNED))
    assert not policy.exceeded
    policy.count(Outcome(0, [], Status.FAILED))
    assert policy.exceeded


def test_a_missing_objective_stops_the_sweep_at_the_first_job():
    from runner.errors import ObjectiveMissing

    class Missing(Sched):
        def submit(self, index):
            self.submitted.append(index)
            future: Future[JobResult] = Future()
            future.set_result(JobResult(f"run{index}", Status.FAILED, {"acc": 1.0}, None,
                                        ObjectiveMissing("objective.metric 'r2' was not produced")))
            return future

    source = Scripted([Status.FINISHED] * 5)
    sched = Missing(source)
    drive(source, sched, FailurePolicy(None, 5))
    assert sched.submitted == [0]
    assert source.outcomes[0].fatal and [o.status for o in source.outcomes[1:]] == [Status.NOT_STARTED] * 4
