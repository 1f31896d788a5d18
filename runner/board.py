"""A grid's cells on an Optuna storage, so that processes on many machines share one grid.

With ``sweep.storage`` set, each cell of a grid is a trial of one Optuna study,
``kmrun-grid-<grid key>``. Optuna is the engine; kmrun adds no protocol of its own:

- a cell waiting to run is a WAITING trial (``enqueue_trial``);
- a process takes it by moving it to RUNNING, which the storage does atomically, so
  exactly one process wins it;
- that process beats the trial's heartbeat while the cell runs;
- a process that dies stops beating. Any other process fails its trial
  (``fail_stale_trials``, or at once by PID on the same host) and queues the cell again.

MLflow records the runs as ever; the board only says who runs what. A cell counts as
settled for this process once a trial of it ended after the process began (``since``):
what ended before was already judged by the MLflow store (``Grid.resume``).
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from . import runtime
from .locks import creation_lock
from .records import Status
from .trial import Heartbeat, fail_dead, own

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

CELL = "kmrun.cell"  # a trial's user attribute: which cell it is (config hash and fingerprint)
ENDED = "kmrun.status"  # set by the process that ends a trial itself: FINISHED, FAILED, PRUNED, KILLED
RUN = "mlflow_run_id"  # the cell's MLflow run


class Board:
    """One grid's cells in an Optuna storage, as every process sharing the grid sees them."""

    def __init__(self, url: str, key: str, since: datetime.datetime) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.since = url, since
        self.storage = runtime.current().storage(url, key="sweep.storage")
        with creation_lock(url):  # processes starting at once create the study once
            self.study = optuna.create_study(study_name=f"kmrun-grid-{key}", storage=self.storage,
                                             load_if_exists=True)
        self._heartbeat: Heartbeat | None = None

    def queue(self, cells: Iterable[str]) -> int:
        """Queue each cell nobody will run: none of its trials waits or runs, and none
        ended since this process began, except trials whose process died or was
        interrupted. Under the storage's lock, so that processes queue a cell once.
        Returns how many were queued."""
        queued = 0
        with creation_lock(self.url), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enqueue_trial's user_attrs: experimental
            trials = self._by_cell()
            for cell in cells:
                if _state(trials.get(cell, []), self.since) is None:
                    self.study.enqueue_trial({}, user_attrs={CELL: cell})
                    queued += 1
        return queued

    def take(self, cells: Collection[str]) -> tuple[int, str] | None:
        """Take a waiting trial of one of ``cells``: the storage moves it to RUNNING for
        one process only. Its heartbeat starts here. Returns (trial id, cell), or None."""
        import optuna
        from optuna.trial import TrialState

        if self._heartbeat is None:  # started here: after the scheduler forked its workers
            self._heartbeat = Heartbeat(self.storage)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            cell = trial.user_attrs.get(CELL)
            if cell not in cells:
                continue
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                    continue  # another process took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            own(self.storage, trial._trial_id)
            self._heartbeat.add(trial._trial_id)
            return trial._trial_id, str(cell)
        return None

    def attach(self, trial_id: int, run_id: str) -> None:
        self.storage.set_trial_user_attr(trial_id, RUN, run_id)

    def end(self, trial_id: int, status: Status) -> None:
        """This process ended the cell: COMPLETE when it FINISHED (or was skipped), else FAIL."""
        import optuna
        from optuna.trial import TrialState

        if self._heartbeat is not None:
            self._heartbeat.remove(trial_id)
        try:
            self.storage.set_trial_user_attr(trial_id, ENDED, status.value)
            done = status in (Status.FINISHED, Status.SKIPPED)
            self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE if done else TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another process took this one for dead and failed the trial: the cell runs again there

    def fail_dead(self) -> list[FrozenTrial]:
        """The RUNNING trials of dead processes, failed (the next ``queue`` queues them again)."""
        return fail_dead(self.study, self.storage)

    def settled(self, cells: Iterable[str]) -> dict[str, FrozenTrial]:
        """Cells another process ended since this one began: the trial that ended each."""
        trials = self._by_cell()
        ended = {}
        for cell in cells:
            last = _ended(trials.get(cell, []), self.since)
            if last is not None:
                ended[cell] = last
        return ended

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _by_cell(self) -> dict[str, list[FrozenTrial]]:
        trials: dict[str, list[FrozenTrial]] = {}
        for trial in self.study.get_trials(deepcopy=False):
            trials.setdefault(str(trial.user_attrs.get(CELL)), []).append(trial)
        return trials


def _state(trials: list[FrozenTrial], since: datetime.datetime) -> str | None:
    """'pending' while one of a cell's trials waits or runs; 'ended' when one ended
    since ``since``; None when nobody will run it."""
    if any(t.state.name in ("WAITING", "RUNNING") for t in trials):
        return "pending"
    return "ended" if _ended(trials, since) is not None else None


def _ended(trials: list[FrozenTrial], since: datetime.datetime) -> FrozenTrial | None:
    """The trial of a cell that a live process ended (not one failed for dead or
    interrupted) since ``since``, if any; a COMPLETE one first."""
    ended = [t for t in trials if t.user_attrs.get(ENDED) not in (None, Status.KILLED.value)
             and t.datetime_complete is not None and t.datetime_complete >= since]
    ended.sort(key=lambda t: t.state.name != "COMPLETE")
    return ended[0] if ended else None


def cell_of(spec: Any) -> str:
    """A cell's identity on the board: its config hash, and what it ran on."""
    return spec.config_hash + (f":{spec.fingerprint.value}" if spec.fingerprint is not None else "")
