"""Who runs which grid cell, among the processes that share a grid: one interface, two ways.

- ``StoreClaims``: the MLflow store decides. A process claims a cell by starting its child
  run under a lock (a file beside SQLite, an advisory lock in PostgreSQL); a RUNNING child
  whose owner lives belongs to that owner. Where the store cannot tell whether another
  host lives (an MLflow server), this process waits for that host's cells, and says so.
- ``BoardClaims``: an Optuna storage decides (``sweep.storage``): each cell is a queued
  trial that one process takes, kept by its heartbeats (``board``).

Either way a cell whose owner died comes back to be run here, and a cell whose worker died
(``lost``) is queued again. The grid owns the cells' outcomes; claims only say who runs
what, and hand back what others ended (``settle``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .engine import Job
from .liveness import host_name
from .records import Outcome, Status

if TYPE_CHECKING:
    from .board import Board
    from .job import JobSpec
    from .tracking import RunStore

log = logging.getLogger(__name__)

Settle = Callable[[Outcome, Any], None]  # a cell another process ended, and its run (or None)


class Claims(Protocol):
    def take(self) -> Job | None:
        """The next cell this process runs, its child run started; None when none is free now."""

    def pending(self) -> bool:
        """Whether cells that other processes hold may still end, or come back to this one."""

    def poll(self) -> None:
        """Look at the cells others hold: take in those they ended, free those whose owner died."""

    def end(self, job: Job, status: Status, lost: bool) -> list[Outcome]:
        """This process ended a cell (``lost``: its worker died, so queue it again). Returns
        other cells of the same config that this job settled."""

    def abandon(self, job: Job) -> None:
        """This process stops running a cell (interrupted): another may run it."""

    def close(self) -> None: ...


def _started(spec: JobSpec, run_id: str) -> JobSpec:
    return replace(spec, run_id=run_id)


def _tags(spec: JobSpec) -> dict[str, str]:
    """What another process compares before it takes a cell as done: the fingerprint."""
    return {**spec.tags, **(spec.fingerprint.tags() if spec.fingerprint else {})}


class StoreClaims:
    """Cells claimed in the MLflow store, one child run per cell, under its lock."""

    def __init__(self, tracker: RunStore, specs: dict[int, JobSpec], todo: list[Outcome], rerun: bool,
                 settle: Settle) -> None:
        self.tracker, self.specs, self.rerun, self.settle = tracker, specs, rerun, settle
        self._queue = iter(todo)
        self._by_index = {cell.index: cell for cell in todo}
        self._elsewhere: dict[int, str] = {}  # cell index -> the run another process runs it in
        self._again: list[Outcome] = []  # cells to claim again: their owner died, or their worker
        self._unknown: set[int] = set()  # cells of another host whose liveness the store cannot tell

    def take(self) -> Job | None:
        while self._again:
            job = self._claim(self._again.pop(0))
            if job is not None:
                return job
        for cell in self._queue:
            job = self._claim(cell)
            if job is not None:
                return job
        return None

    def _claim(self, cell: Outcome) -> Job | None:
        spec = self.specs[cell.index]
        run_id, other = self.tracker.claim(spec.config_hash, spec.run_name, _tags(spec), spec.parent_run_id or "",
                                           rerun=self.rerun,
                                           fingerprint=spec.fingerprint.value if spec.fingerprint else None)
        if run_id is None and other.info.status == "RUNNING":  # another kmrun runs it now
            self._elsewhere[cell.index] = other.info.run_id
            return None
        if run_id is None:  # another sweep (or kmrun) finished it
            self.settle(cell, other)
            return None
        self.specs[cell.index] = spec = _started(spec, run_id)
        return Job(spec, cell)

    def pending(self) -> bool:
        return bool(self._elsewhere or self._again)

    def poll(self) -> None:
        """A cell's owner on this host is checked by PID; on another, through PostgreSQL's
        locks; on a store without locks it is taken to live (``_unknown``)."""
        for index, run_id in list(self._elsewhere.items()):
            run = self.tracker.client.get_run(run_id)
            if run.info.status == "RUNNING":
                if self.tracker.owner_alive(run):
                    self._warn_unknown(index, run)
                    continue
                self.tracker.end_stale(run_id)  # its process died: FAILED, kmrun.stale
            del self._elsewhere[index]
            cell = self._by_index[index]
            run = self.tracker.client.get_run(run_id)
            if run.info.status == "FINISHED":
                self.settle(cell, run)
            else:  # it died with its process, or failed there: this process runs it
                self._again.append(cell)

    def _warn_unknown(self, index: int, run: Any) -> None:
        """Once per cell: another host runs it, and this store cannot tell if that host lives."""
        if index in self._unknown or run.data.tags.get("kmrun.host") == host_name():
            return
        self._unknown.add(index)
        log.warning(
            "Waiting for cell %s, which host %s runs (run %s). On this MLflow store kmrun cannot tell whether "
            "that host is alive; if it is gone, this wait does not end. Share grids across machines through "
            "an Optuna storage instead: sweep.storage=postgresql://USER@HOST/DB.",
            index, run.data.tags.get("kmrun.host", "?"), run.info.run_id)

    def end(self, job: Job, status: Status, lost: bool) -> list[Outcome]:
        if job.spec.run_id:
            self.tracker.release(job.spec.run_id)
        if lost:
            self._again.append(job.outcome)
        return []

    def abandon(self, job: Job) -> None:
        if job.spec.run_id:
            self.tracker.release(job.spec.run_id)

    def close(self) -> None:
        return None


class BoardClaims:
    """Cells as queued trials of an Optuna study that every sharing process sees."""

    def __init__(self, board: Board, tracker: RunStore, specs: dict[int, JobSpec], todo: list[Outcome],
                 settle: Settle) -> None:
        from .board import cell_of

        self.board, self.tracker, self.specs, self.settle = board, tracker, specs, settle
        self._open: dict[str, list[Outcome]] = {}  # cells not yet ended, by identity (config and fingerprint)
        for cell in todo:
            self._open.setdefault(cell_of(specs[cell.index]), []).append(cell)
        board.queue(self._open)

    def take(self) -> Job | None:
        taken = self.board.take(self._open)
        if taken is None:
            return None
        trial_id, identity = taken
        cell = self._open[identity][0]
        spec = self.specs[cell.index]
        run_id = self.tracker.start(spec.run_name, {**_tags(spec), "kmrun.config_hash": spec.config_hash},
                                    spec.parent_run_id)
        self.board.attach(trial_id, run_id)
        self.specs[cell.index] = spec = _started(spec, run_id)
        return Job(spec, cell, token=(trial_id, identity))

    def pending(self) -> bool:
        return bool(self._open)

    def poll(self) -> None:
        """Fail the cells of dead processes (their runs end FAILED) and queue them again;
        take in the cells others ended."""
        for trial in self.board.fail_dead():
            if trial.user_attrs.get("mlflow_run_id"):  # FAILED even if it FINISHED: the cell runs again
                self.tracker.end_stale(trial.user_attrs["mlflow_run_id"], trial_failed=True)
        self.board.queue(self._open)
        for identity, trial in self.board.settled(self._open).items():
            run_id = trial.user_attrs.get("mlflow_run_id")
            for cell in self._open.pop(identity):
                self.settle(cell, self.tracker.client.get_run(run_id) if run_id else None)

    def end(self, job: Job, status: Status, lost: bool) -> list[Outcome]:
        trial_id, identity = job.token
        self.board.end(trial_id, Status.KILLED if lost else status)  # KILLED: queued again
        if lost:
            self.board.queue([identity])
            return []
        return [c for c in self._open.pop(identity, []) if c is not job.outcome]

    def abandon(self, job: Job) -> None:
        if job.token is not None:
            self.board.end(job.token[0], Status.KILLED)  # another process may run it again

    def close(self) -> None:
        self.board.close()
