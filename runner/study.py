"""An Optuna study as a job source for the engine: ask a trial, run it, tell its result.

The search space is written in Hydra's sweep grammar and read by Hydra's parser. Each
trial is told as soon as it is back: no batch barrier. Several kmrun processes on one
storage and study name share the work, as with Optuna's own ``optimize``; only the
first ``n_trials`` non-failed trials by number run, and trials of dead processes are
failed.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import runtime
from .cells import JobComposer, spec_of
from .compose import default_groups
from .engine import Job
from .errors import ConfigError, after
from .job import JobSpec
from .records import BestTrial, Constraint, JobResult, Outcome, Status, StudySummary
from .redact import hide_password, is_secret_name
from .space import CONSTRAINTS, Space, check_options, make_sampler, set_constraints
from .storage import default_storage
from .trial import Heartbeat, TrialRef, fail_dead, make_pruner, own
from .warm import WARM_FROM, enqueued, experiment_values, trials_from_runs

if TYPE_CHECKING:
    import optuna

    from .compose import Composer
    from .schema import KmrunConf, StudyConf
    from .tracking import RunStore

log = logging.getLogger(__name__)

VERSION_FROM = "kmrun.version_from"  # the study's first trial on the current code, config, data and environment
TELL = {Status.FINISHED: "COMPLETE", Status.PRUNED: "PRUNED", Status.FAILED: "FAIL", Status.KILLED: "FAIL"}


class Study:
    """One invocation of a study, as the engine's job source."""

    def __init__(self, composer: Composer, conf: KmrunConf, base: list[str], space: Space, name: str) -> None:
        if conf.objective.metric is None:
            raise ConfigError("A study needs objective.metric (and objective.direction) to optimise.")
        self.conf = conf
        self.settings: StudyConf = conf.study  # type: ignore[assignment]
        self.base, self.name = base, name
        secret = [key for key in space.names() if is_secret_name(key)]
        if secret:
            raise ConfigError(
                f"study.search_space: '{secret[0]}' names a secret; a study cannot search it, since Optuna "
                "stores every value it tries in its storage. Search other keys, or sweep it in a grid (-m)."
            )
        self.space = space
        self.constraints = [Constraint.parse(c) for c in conf.objective.constraints]
        self.distributions = space.flat  # every trial's; a family's keys come with its option (Space.sample)
        self.outcomes: list[Outcome] = []
        self._compose = JobComposer(composer, base)
        self._conf_dir, self._base_dir = composer.config_dir, composer.base_dir
        self._heartbeat: Heartbeat | None = None
        self._stopped = False
        self._deadline = math.inf
        # set in order: check() (composes, opens the storage), begin() (the study), start() (the parent)
        self.corners: list[JobSpec] = []  # a job at each end of every distribution
        self.storage_url = ""
        self.storage: Any = None
        self.target = 0  # COMPLETE + PRUNED trials the study should hold when this run ends
        self.planned = 0  # trials this invocation means to run
        self.parent = ""  # the parent run
        self.sweep_dir = Path()
        self._tracker: RunStore | None = None
        self._study: optuna.Study | None = None
        self.warm_started: list[str] | None = None  # with study.warm_start: the runs added as trials

    @property
    def first(self) -> JobSpec:
        return after("Study.check()", self.corners[0] if self.corners else None)

    @property
    def tracker(self) -> RunStore:
        return after("Study.begin()", self._tracker)

    @property
    def study(self) -> optuna.Study:
        return after("Study.begin()", self._study)

    def job_spec(self, values: Mapping[str, Any], open_store: bool = True) -> JobSpec:
        lines = [f"{key}={_literal(value)}" for key, value in values.items()]
        return spec_of(self._compose, lines, self.base + lines, self._conf_dir, open_store, self._base_dir)

    def check(self) -> None:
        """Compose a job at each end of every distribution: bad keys and types fail now."""
        make_pruner(self.settings.pruner)
        make_sampler(self.settings.sampler, self.space, 0)
        self.corners = [self.job_spec(corner) for corner in self.space.corners()]
        if self.space.families:
            check_options(self.space, lambda lines: self._compose(lines)[0], self._compose.composer.groups(),
                          self._conf_dir.name)
        self.storage_url = self.settings.storage or _beside(self.first.uri)
        self.storage = runtime.current().storage(self.storage_url)

    def begin(self, tracker: RunStore) -> list[str]:
        """Create or load the study, fail what dead processes left, set the target."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._tracker = tracker
        directions = self.conf.objective.direction
        directions = directions if isinstance(directions, list) else [directions]
        try:
            n_existing = len(optuna.load_study(study_name=self.name, storage=self.storage).trials)
        except KeyError:
            n_existing = 0
        self._study = optuna.create_study(
            study_name=self.name, storage=self.storage, load_if_exists=True, directions=directions,
            sampler=make_sampler(self.settings.sampler, self.space, n_existing, bool(self.constraints)),
            pruner=make_pruner(self.settings.pruner),
        )
        if [d.name.lower() for d in self.study.directions] != directions:
            raise ConfigError(
                f"Study '{self.name}' in {hide_password(self.storage_url)} was created with directions "
                f"{[d.name.lower() for d in self.study.directions]}, not {directions}. Use another study.name."
            )
        self._fail_stale()
        notes = self._learn()
        finished = self._count("COMPLETE", "PRUNED")
        fingerprint = self.first.fingerprint
        if fingerprint is not None:
            changed = fingerprint.changed(self.study.user_attrs) if finished else []
            if changed and changed != ["unrecorded"]:
                since = len(self.study.trials)  # a parent reports only the trials of one version
                self.study.set_user_attr(VERSION_FROM, since)
                notes.append(f"Study '{self.name}': {' and '.join(changed)} changed since its finished trials. "
                             f"They still count towards n_trials and the sampler learns from them, but the best "
                             f"this run reports is of trials {since} on. Use another study.name to start over.")
            for key, value in fingerprint.tags().items():
                self.study.set_user_attr(key, value)
        more = self.settings.more
        self.target = finished + more if more is not None else self.settings.n_trials
        grid_size = _grid_size(self.study.sampler)
        if grid_size is not None and self.target > grid_size:
            notes.append(f"The grid sampler has {grid_size} points; the study stops there (not at {self.target}).")
            self.target = grid_size
        if finished:
            notes.append(f"Study '{self.name}': {finished} trials already finished; "
                         f"running until it holds {self.target}.")
        self.planned = max(self.target - finished, 0)
        return notes

    def _learn(self) -> list[str]:
        """``study.warm_start``: finished runs of the store that fit, as completed trials;
        ``study.enqueue``: param sets the sampler gives first."""
        notes = []
        if self.settings.warm_start:
            known = {str(t.user_attrs.get("mlflow_run_id")) for t in self.study.trials}
            metric = self.conf.objective.metric
            trials = trials_from_runs(self.tracker.search("attributes.status = 'FINISHED'"), self.space,
                                      self._identity_of, metric if isinstance(metric, list) else [metric],
                                      self.constraints, known)
            self.study.add_trials(trials)
            self.warm_started = [str(t.user_attrs[WARM_FROM]) for t in trials]
            runs = ", ".join(r[:12] for r in self.warm_started[:8]) + (" ..." if len(trials) > 8 else "")
            notes.append(f"Warm start: added {len(trials)} trials from finished runs ({runs})." if trials else
                         "Warm start: no finished run in the store fits the search space on the current code, "
                         "config and data.")
        if self.settings.enqueue:
            sets = enqueued(self.settings.enqueue, self.space,
                            lambda name: experiment_values(self._compose.composer, name, self.space))
            for values in sets:
                self.study.enqueue_trial(values, skip_if_exists=True)
            notes.append(f"Enqueued {len(sets)} param set(s) to run first.")
        return notes

    def _identity_of(self, values: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """What a trial with ``values`` would be now: its fingerprint, and the params it records."""
        from .job import recorded_params

        spec = self.job_spec(values, open_store=False)
        return spec.fingerprint.value if spec.fingerprint is not None else "", recorded_params(spec)

    def parent_tags(self, command: str) -> dict[str, str]:
        tags = {
            "kmrun.role": "parent", "kmrun.kind": "study", "kmrun.sweep": command[:5000],
            "optuna.study_name": self.name, "optuna.storage": hide_password(self.storage_url),
            "optuna.sampler": type(self.study.sampler).__name__, "optuna.pruner": type(self.study.pruner).__name__,
        }
        if self.study.user_attrs.get(VERSION_FROM):  # this parent reports the trials from this one on
            tags["kmrun.study.version_from"] = str(self.study.user_attrs[VERSION_FROM])
        return tags

    def start(self, parent: str, sweep_dir: Path) -> None:
        self.parent, self.sweep_dir = parent, sweep_dir
        if self.settings.timeout:
            self._deadline = time.monotonic() + self.settings.timeout

    # the engine's Source protocol
    def next(self) -> Job | None:
        if self._stopped or time.monotonic() >= self._deadline:
            return None
        if self._count("COMPLETE", "PRUNED", "RUNNING") >= self.target:
            return None  # reached, or being reached by running trials (ours or another process's)
        if self._heartbeat is None:  # started here: after the scheduler forked its workers
            self._heartbeat = Heartbeat(self.storage)
        with warnings.catch_warnings():
            # kmrun records heartbeats itself; Optuna assumes only optimize() does
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask(self.distributions)
        if self._surplus(trial):
            self.study.tell(trial, state=_state("FAIL"))
            self._stopped = True
            return None
        self.space.sample(trial)  # a family's option, then its keys
        own(self.storage, trial._trial_id)
        self._heartbeat.add(trial._trial_id)
        outcome = Outcome(trial.number, [f"{k}={_literal(v)}" for k, v in trial.params.items()])
        self.outcomes.append(outcome)
        return Job(self._spec(trial), outcome, trial)

    def exhausted(self) -> bool:
        if self._stopped or time.monotonic() >= self._deadline:
            return True
        return self._count("COMPLETE", "PRUNED") >= self.target

    def wait_outside(self) -> None:
        """Only other processes' trials are running: wait for them (or for them to turn
        out stale), so that this process ends with the study complete."""
        if self._count("RUNNING"):
            time.sleep(1.0)
            self._fail_stale()

    def record(self, job: Job, result: JobResult) -> None:
        job.outcome.take(result)
        try:
            if result.status is Status.FINISHED and self.constraints:  # before tell: the sampler reads them then
                set_constraints(job.token, [str(c) for c in self.constraints],
                                [c.violation(result.metrics) for c in self.constraints])
            if result.status is Status.FINISHED:
                told = self.study.tell(job.token, result.objective, skip_if_finished=True)
            else:
                told = self.study.tell(job.token, state=_state(TELL[result.status]), skip_if_finished=True)
            if told.state.name != TELL[result.status]:  # another process failed it as stale meanwhile
                self._taken_from_us(job, told.state.name)
        except RuntimeError as err:
            # GridSampler calls study.stop() when its grid is done, which only optimize()
            # allows; the trial's state is stored before that, so nothing is lost.
            if "Study.stop" not in str(err):
                raise
        finally:
            if self._heartbeat is not None:
                self._heartbeat.remove(job.token._trial_id)

    def _taken_from_us(self, job: Job, state: str) -> None:
        """This process ran a trial that another one ended meanwhile (it took this one for
        dead: a paused VM, a laptop asleep). The trial stays as the study has it; the run
        agrees with it (FAILED), and the sweep goes on."""
        run_id = job.outcome.run_id
        log.warning("Trial %s was ended %s by another process while this one ran it (was this process paused?); "
                    "its run %s is FAILED to match, and the study goes on.", job.token.number, state, run_id)
        if run_id:
            self.tracker.client.set_tag(run_id, "kmrun.stale", "true")
            self.tracker.finish(run_id, "FAILED")
        job.outcome.status, job.outcome.objective = Status.FAILED, None
        job.outcome.error = f"trial {job.token.number} was ended {state} by another process while this one ran it"

    def abandon(self, job: Job) -> None:
        self.study.tell(job.token, state=_state("FAIL"))
        job.outcome.status = Status.KILLED

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def summary(self, export_to: Path | None) -> StudySummary:
        """What the study holds now, as plain data; writes ``study.export_best`` if asked."""
        trials = self.study.get_trials(deepcopy=False)
        states: dict[str, int] = {}
        for trial in trials:
            states[trial.state.name] = states.get(trial.state.name, 0) + 1
        since = int(self.study.user_attrs.get(VERSION_FROM, 0))  # trials of other code or data come before
        complete = [t for t in trials if t.number >= since and t.state.name == "COMPLETE"]
        current = [t for t in complete if all(v <= 0 for v in t.user_attrs.get(CONSTRAINTS, []))]  # feasible
        best, experiment, by_option = [], None, {}
        if current:
            chosen = _best_of(current, self.study.directions)
            best = [_best_trial(t) for t in chosen]
            if len(self.study.directions) == 1:
                experiment = self._best_experiment(chosen[0])
                for group, options in self.space.families.items():  # the best of each option too
                    for option in options:
                        of_option = [t for t in current if str(t.params.get(group)) == option]
                        if of_option:
                            by_option[f"{group}={option}"] = _best_trial(_best_of(of_option, self.study.directions)[0])
        if experiment is not None and export_to is not None:
            export_to.parent.mkdir(parents=True, exist_ok=True)
            export_to.write_text(experiment, encoding="utf-8")
        frame = self.study.trials_dataframe()
        return StudySummary(
            name=self.name, storage=hide_password(self.storage_url), storage_url=self.storage_url,
            target=self.target, states=states, best=best, trials_csv=frame.to_csv(index=False),
            sampler=type(self.study.sampler).__name__, best_experiment=experiment, by_option=by_option,
            warm_started=len(self.warm_started) if self.warm_started is not None else None,
            infeasible=len(complete) - len(current) if self.constraints else None,
            exported_to=str(export_to) if experiment is not None and export_to is not None else None,
        )

    def _best_experiment(self, trial: Any) -> str:
        from .results import experiment_file

        spec = self.job_spec(trial.params, open_store=False)
        overridable = default_groups(self._conf_dir)
        return experiment_file(
            spec.redact, spec.config,
            f"Best trial {trial.number} of Optuna study '{self.name}': "
            f"{self.conf.objective.metric} = {trial.value:.6g}.",
            f"best of {self.name} (trial {trial.number})",
            {group: option for group, option in spec.groups.items() if group in overridable},
        )

    def _count(self, *states: str) -> int:
        return len(self.study.get_trials(deepcopy=False, states=tuple(_state(s) for s in states)))

    def _fail_stale(self) -> int:
        """Trials (and MLflow runs) of dead processes: failed, never left RUNNING. A dead
        trial's MLflow run and its process's parent run end FAILED, tagged kmrun.stale."""
        stale_runs = set(self.tracker.fail_stale_runs())  # this host's, by PID
        dead = fail_dead(self.study, self.storage)
        for trial in dead:
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id and run_id not in stale_runs:
                self.tracker.end_stale(run_id, with_parent=True, trial_failed=True)
        return len(dead)

    def _surplus(self, trial: optuna.Trial) -> bool:
        """Another process may have asked at the same time: only the first ``target``
        non-failed trials by number run, so the study never overshoots."""
        live = self.study.get_trials(deepcopy=False, states=(_state("COMPLETE"), _state("PRUNED"), _state("RUNNING")))
        return sum(t.number <= trial.number for t in live) > self.target

    def _spec(self, trial: optuna.Trial) -> JobSpec:
        spec = self.job_spec(trial.params)
        ref = TrialRef(self.storage_url, self.name, trial._trial_id, trial.number,
                       tuple(sorted(self.settings.pruner.items())))
        dists = {k: repr(d) for k, d in self.space.active(trial.params).items()}
        return replace(
            spec, parent_run_id=self.parent, run_name=f"trial {trial.number}", trial=ref,
            output_dir=str(self.sweep_dir / f"trial-{trial.number}"),
            tags={
                "kmrun.role": "child", "kmrun.kind": "trial", "optuna.study_name": self.name,
                "optuna.trial_number": str(trial.number), "optuna.sampler": type(self.study.sampler).__name__,
                "optuna.distributions": json.dumps(dists)[:5000],
            },
        )


def _best_of(complete: list[Any], directions: list[Any]) -> list[Any]:
    """The best of these trials: one for a single objective, the Pareto front for several."""
    import optuna
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    if len(directions) > 1:
        return list(_get_pareto_front_trials_by_trials(complete, directions))
    pick = max if directions[0] == optuna.study.StudyDirection.MAXIMIZE else min
    return [pick(complete, key=lambda t: t.value)]


def _best_trial(trial: Any) -> BestTrial:
    run = str(trial.user_attrs.get("mlflow_run_id", ""))
    return BestTrial(trial.number, list(trial.values), dict(trial.params), run)


def _grid_size(sampler: Any) -> int | None:
    grid = getattr(sampler, "_all_grids", None)
    return len(grid) if grid is not None and type(sampler).__name__ == "GridSampler" else None


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return repr(value) if isinstance(value, float) else str(value)


def _beside(uri: str) -> str:
    """The default storage (``storage.default_storage``). A shared store (a server, a
    database) has none: a study kept in a file on one machine would silently split a
    many-machine study into one study per machine."""
    found = default_storage(uri)
    if found is None:
        raise ConfigError(
            f"study.storage is not set, and the MLflow store ({hide_password(uri)}) is shared, not a local file. "
            "Set study.storage to a database every machine reaches (study.storage=postgresql://USER@HOST/DB), "
            "or to sqlite:///optuna.db to keep the study on this machine only."
        )
    return found
