"""The plain data that crosses layers: job statuses, a job's result, a sweep's outcome.

Everything here pickles (it crosses worker processes) and holds no live object: the
report layer (``results``, ``terminal``) reads these records and never calls back up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import KmrunError, ObjectiveMissing, StoreUnavailable


class Status(StrEnum):
    """How a job ended. A PRUNED trial's MLflow run is KILLED; SKIPPED and NOT_STARTED
    jobs have no new run."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    PRUNED = "PRUNED"
    SKIPPED = "SKIPPED"  # already FINISHED in the store (a resumed grid)
    NOT_STARTED = "NOT_STARTED"  # the failure policy or an interrupt stopped the sweep first

    @property
    def run_status(self) -> str:
        """The MLflow run status this job's run ends with."""
        return "KILLED" if self is Status.PRUNED else self.value

    @property
    def done(self) -> bool:
        """Finished now or before: counts towards a complete sweep."""
        return self in (Status.FINISHED, Status.SKIPPED)


@dataclass
class JobResult:
    """How one job ended, as the worker that ran it reports it."""

    run_id: str
    status: Status
    metrics: dict[str, float]
    objective: float | list[float] | None
    error: KmrunError | None = None  # JobFailed, MetricError, KmrunBug...: the type is kept
    written: dict[str, str] = field(default_factory=dict)  # dataset -> file it was written to
    cached: dict[str, str] = field(default_factory=dict)  # node served from the cache -> run that computed it

    @property
    def message(self) -> str | None:
        return str(self.error) if self.error is not None else None


@dataclass(slots=True)  # a 100,000-cell grid holds 100,000
class Outcome:
    """One job of a sweep (a grid cell or a study trial) and how it ended."""

    index: int  # the cell's index, or the trial's number
    swept: list[str]  # the swept overrides of this job, as typed
    status: Status = Status.NOT_STARTED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    objective: Any = None
    error: str | None = None
    fatal: bool = False  # its error would repeat in every job (no objective produced, the store is away)

    @property
    def label(self) -> str:
        """``C=0.1 seed=2``: the last part of each swept key, and its value."""
        return " ".join(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in self.swept)

    @property
    def values(self) -> dict[str, str]:
        """``{"params.model.C": "0.1"}``."""
        return dict(o.lstrip("+").split("=", 1) for o in self.swept)  # type: ignore[misc]

    def score(self) -> float | None:
        """The (first) objective, when the job is done and it is a finite number."""
        value = self.objective[0] if isinstance(self.objective, list) else self.objective
        if self.status.done and isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        return None

    def take(self, result: JobResult) -> None:
        self.status, self.run_id, self.metrics = result.status, result.run_id, result.metrics
        self.objective, self.error = result.objective, result.message
        self.fatal = isinstance(result.error, (ObjectiveMissing, StoreUnavailable))


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    """The one set of counts every sweep reports."""
    status = [o.status for o in outcomes]
    return {
        "jobs_total": len(outcomes),
        "jobs_finished": sum(s.done for s in status),
        "jobs_failed": status.count(Status.FAILED),
        "jobs_killed": status.count(Status.KILLED),
        "jobs_pruned": status.count(Status.PRUNED),
        "jobs_skipped": status.count(Status.SKIPPED),
        "jobs_not_started": status.count(Status.NOT_STARTED),
    }


@dataclass(frozen=True)
class Constraint:
    """``f1_macro >= 0.9``: a job is feasible when its metric is on the right side."""

    metric: str
    op: str  # <= or >=
    bound: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """``METRIC <= NUMBER`` or ``METRIC >= NUMBER``; ValueError otherwise."""
        found = re.fullmatch(r"\s*(\S+?)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", str(text))
        if found is None:
            raise ValueError(text)
        return cls(found[1], found[2], float(found[3]))

    def violation(self, metrics: dict[str, float]) -> float:
        """How far past its bound the metric is (≤ 0: feasible), Optuna's convention; a
        missing or non-finite metric is infeasible."""
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return math.inf
        return float(value) - self.bound if self.op == "<=" else self.bound - float(value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def feasible(constraints: list[Constraint], metrics: dict[str, float]) -> bool:
    return all(c.violation(metrics) <= 0 for c in constraints)


@dataclass
class Objective:
    """What a sweep ranks by: metric names and directions, one each, or lists; and the
    constraints a job must meet to be ranked best."""

    metrics: list[str]
    directions: list[str]
    constraints: list[Constraint] = field(default_factory=list)

    @property
    def primary(self) -> tuple[str | None, str]:
        return (self.metrics[0] if self.metrics else None), (self.directions[0] if self.directions else "maximize")


@dataclass
class BestTrial:
    number: int
    values: list[float]
    params: dict[str, Any]
    run_id: str


@dataclass
class StudySummary:
    """What a study holds after this invocation, read from its storage."""

    name: str
    storage: str  # the storage URL with any password hidden
    storage_url: str  # the real URL, to open it again (never logged or printed)
    target: int
    states: dict[str, int]  # COMPLETE, PRUNED, FAIL, RUNNING... over the whole study
    best: list[BestTrial]  # the best trial, or the Pareto set
    trials_csv: str
    sampler: str
    best_experiment: str | None = None  # a conf/experiment file that reruns the best trial
    exported_to: str | None = None  # where study.export_best wrote it
    by_option: dict[str, BestTrial] = field(default_factory=dict)  # "model=random_forest" -> its best trial
    infeasible: int | None = None  # COMPLETE trials outside objective.constraints (None: no constraints)
    warm_started: int | None = None  # trials this invocation added from runs in the store (None: no warm start)

    @property
    def finished(self) -> int:
        return self.states.get("COMPLETE", 0) + self.states.get("PRUNED", 0)


@dataclass
class SweepOutcome:
    """What ``runner.sweep`` returns: every job's outcome, and where the records are."""

    kind: str  # grid | study
    outcomes: list[Outcome]
    objective: Objective
    parent_run_id: str | None
    command: str  # the command that resumes this sweep
    uri: str  # the MLflow store
    dry_run: bool = False
    study: StudySummary | None = None
    notes: list[str] = field(default_factory=list)  # what kmrun said along the way

    @property
    def counts(self) -> dict[str, int]:
        found = counts(self.outcomes)
        if self.objective.constraints:  # done, but outside the constraints: never the best
            done = [o for o in self.outcomes if o.score() is not None]
            found[f"{'trials' if self.kind == 'study' else 'jobs'}_infeasible"] = sum(
                not feasible(self.objective.constraints, o.metrics) for o in done)
        return found

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 0
        if any(o.fatal for o in self.outcomes):
            return 2  # bad input, found by the first job
        if self.study is not None:
            return 0 if self.study.finished + self.study.states.get("RUNNING", 0) >= self.study.target else 1
        return 0 if all(o.status.done for o in self.outcomes) else 1

    def ranked(self) -> list[Outcome]:
        """Outcomes by objective, best first: the feasible ones (``objective.constraints``),
        then the infeasible ones, then those without an objective, in their order."""
        sign = -1.0 if self.objective.primary[1] == "maximize" else 1.0
        rules = self.objective.constraints
        return sorted(self.outcomes, key=lambda o: (o.score() is None, not feasible(rules, o.metrics),
                                                    sign * (o.score() or 0.0), o.index))

    def best(self) -> Outcome | None:
        top = self.ranked()
        if not top or top[0].score() is None or not feasible(self.objective.constraints, top[0].metrics):
            return None
        return top[0]
