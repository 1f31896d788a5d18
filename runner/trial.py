"""Optuna trials, as a job and its sweep see them.

A job's side: open the study's storage, build its pruner, and let a node report
intermediate values to its trial (and be pruned) through that storage; a worker process
needs only this and ``job``. The sweep's side (``study``, ``board``): keep the heartbeats
of the trials this process runs (``Heartbeat``, ``own``), and fail the trials of dead
processes (``fail_dead``: Optuna's stale-trial check, and ``liveness`` for this host).
"""

from __future__ import annotations

import datetime
import inspect
import logging
import threading
import warnings
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from . import runtime
from .errors import ConfigError
from .liveness import owner_gone, owner_label, stale_trials
from .storage import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
}
OWNER = "kmrun.owner"  # a trial's user attribute: HOST:PID of the process that runs it
UNCLAIMED_SECONDS = 10  # a RUNNING trial with no owner after this: its taker died at once


@dataclass(frozen=True)
class TrialRef:
    """Which trial a job is: plain data, so it crosses processes."""

    storage: str
    study_name: str
    trial_id: int
    number: int
    pruner: tuple[tuple[str, Any], ...]  # the pruner's config, as sorted items


def make_pruner(config: dict[str, Any]) -> optuna.pruners.BasePruner:
    """``{name: median, n_warmup_steps: 2}`` → ``MedianPruner(n_warmup_steps=2)``."""
    import optuna

    return build_from_config(optuna.pruners, PRUNERS, config, "study.pruner")


def build_from_config(module: Any, names: dict[str, str], config: dict[str, Any], key: str) -> Any:
    options = dict(config)
    name = str(options.pop("name", "")).lower()
    if name not in names:
        raise ConfigError(f"{key}.name is {name!r}; use one of: {', '.join(names)}.")
    cls = getattr(module, names[name])
    try:
        return cls(**options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise ConfigError(
            f"{key}: {err}. {names[name]} accepts: {', '.join(accepted) or 'no options'}."
        ) from None
    except (ValueError, ImportError, ModuleNotFoundError) as err:
        raise ConfigError(f"{key}: {name}: {err}") from None


@cache
def _study(storage: str, study_name: str, pruner: tuple[tuple[str, Any], ...]) -> optuna.Study:
    import optuna

    storage_ = runtime.current().storage(storage)
    return optuna.load_study(study_name=study_name, storage=storage_, pruner=make_pruner(dict(pruner)))


def handle(ref: TrialRef) -> optuna.Trial:
    """The live trial a worker reports to."""
    import optuna

    return optuna.trial.Trial(_study(ref.storage, ref.study_name, ref.pruner), ref.trial_id)


def attach(ref: TrialRef, run_id: str) -> None:
    """Record the MLflow run of a trial in the study (a user attribute)."""
    runtime.current().storage(ref.storage).set_trial_user_attr(ref.trial_id, "mlflow_run_id", run_id)


def report(ref: TrialRef, value: float, step: int) -> None:
    """Report to the trial; raise ``optuna.TrialPruned`` when the pruner says stop."""
    import optuna

    trial = handle(ref)
    trial.report(value, step)
    if trial.should_prune():
        raise optuna.TrialPruned(f"trial {ref.number} pruned at step {step} (value {value:.6g})")


class Heartbeat:
    """Records a heartbeat for every running trial, so that a killed process's trials
    can be found stale and failed (``optuna.storages.fail_stale_trials``)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self.trials: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if _beats(storage):
            self._thread = threading.Thread(target=self._beat, name="kmrun-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            for trial_id in list(self.trials):
                try:
                    self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                except Exception as err:  # a missed beat only makes the trial look stale sooner
                    log.warning("Missed the heartbeat of trial %s: %s", trial_id, err)

    def add(self, trial_id: int) -> None:
        self.trials.add(trial_id)
        if self._thread is not None:
            self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def remove(self, trial_id: int) -> None:
        self.trials.discard(trial_id)

    def stop(self) -> None:
        self._stop.set()


def _beats(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps heartbeats (an RDB storage opened by ``open_storage``)."""
    return bool(getattr(storage, "get_heartbeat_interval", lambda: None)())


def own(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Record this process as the trial's owner (``fail_dead`` reads it)."""
    storage.set_trial_user_attr(trial_id, OWNER, owner_label())


def fail_dead(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[optuna.trial.FrozenTrial]:
    """Fail the RUNNING trials whose process died, and return them as they were: on any
    host once their heartbeat stopped (Optuna's ``fail_stale_trials``); on this host as
    soon as their owner's PID is gone; and a trial no process owned ``UNCLAIMED_SECONDS``
    after it was taken (its taker died at once)."""
    import optuna
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return []
    dead: list[optuna.trial.FrozenTrial] = []
    if _beats(storage):
        stale_trials()  # only this call's: Optuna reports each through note_stale_trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        dead += stale_trials()  # this study's: the callback runs inside fail_stale_trials
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        gone = owner is not None and owner_gone(str(owner))
        unclaimed = owner is None and trial.datetime_start is not None and (
            now - trial.datetime_start).total_seconds() > UNCLAIMED_SECONDS
        if gone or unclaimed:
            try:
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it ended meanwhile
            dead.append(trial)
    return dead
