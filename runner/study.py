"""kmrun's Optuna sweeper: a study from YAML, run with ask and tell.

The search space is written in Hydra's sweep grammar and read by Hydra's parser. The
orchestrator asks for a trial, composes its job, hands it to the same ``Pool`` grids
use, and tells the result as soon as it is back: no batch barrier. Several kmrun
processes on one storage and study name share the work, as with Optuna's own
``optimize``. Each invocation has one parent MLflow run; each trial is a child.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import terminal
from .compose import as_typed, hydra_args
from .errors import ConfigError
from .job import JobResult, JobSpec, open_tracker, prepare, redactor
from .schema import KmrunConf, StudyConf
from .pool import Pool
from .sweep import Cell, Composer, SweepOutcome, _check_sweepable, _conf_dir, _parse, _without_hydra
from .tracking import _alive, process_tags
from .trial import Heartbeat, TrialRef, _build, hide_password, make_pruner, open_storage

if TYPE_CHECKING:
    import optuna
    from hydra.core.override_parser.types import Override
    from hydra.types import HydraContext
    from omegaconf import DictConfig

SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "nsgaii": "NSGAIISampler",
    "qmc": "QMCSampler",
    "grid": "GridSampler",
}
UNCLAIMED_SECONDS = 10
NEEDS = {"cmaes": "cmaes", "gp": "torch"}  # samplers whose package Optuna imports only when sampling
TELL = {"FINISHED": "COMPLETE", "PRUNED": "PRUNED", "FAILED": "FAIL", "KILLED": "FAIL"}


def run_study(hydra_context: HydraContext, config: DictConfig, arguments: list[str], conf: KmrunConf, command: str) -> SweepOutcome:
    assert conf.study is not None
    base, space = search_space(hydra_context, conf.study.search_space, arguments)
    distributions = {key: distribution(key, override) for key, override in space.items()}
    if conf.objective.metric is None:
        raise ConfigError("A study needs objective.metric (and objective.direction) to optimise.")
    name = conf.study.name or str(config.hydra.runtime.choices.get("study") or "study")
    runner = Study(hydra_context, config, conf, base, distributions, name, command)
    runner.check()
    return runner.run()


def search_space(
    hydra_context: HydraContext, yaml_space: Mapping[str, Any], arguments: list[str]
) -> tuple[list[str], dict[str, Override]]:
    """Shared overrides, and the search space: ``study.search_space`` plus the command
    line's sweep expressions, which add keys or replace them."""
    lines = hydra_args([f"{key}={value}" for key, value in yaml_space.items()]) + list(arguments)
    base: list[str] = []
    space: dict[str, Override] = {}
    for override in _parse(hydra_context, lines):
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override():
            _check_sweepable(key)
            space[key] = override
        else:
            base.append(override.input_line)
            space.pop(key, None)
    if not space:
        raise ConfigError(
            "Empty search space: set study.search_space in the study file, or give sweep "
            "expressions such as params.model.C='interval(0.01,10)'."
        )
    return base, space


def distribution(key: str, override: Override) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from a Hydra sweep expression, checked."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    log = "log" in getattr(sweep, "tags", set())
    where = f"study.search_space {as_typed([override.input_line])[0]}"
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None or not low < high:
            raise ConfigError(f"{where}: the interval is empty or inverted; write interval(LOW, HIGH) with LOW < HIGH.")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log scale needs LOW > 0 (got {low}).")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        values = list(range(start, stop, step)) if all(isinstance(v, int) for v in (start, stop, step)) else None
        if values is not None:
            if not values:
                raise ConfigError(f"{where}: range() is empty.")
            return IntDistribution(values[0], values[-1], step=step, log=log)
        floats = [float(v) for v in override.sweep_iterator()]
        if not floats:
            raise ConfigError(f"{where}: range() is empty.")
        return CategoricalDistribution(floats)
    if isinstance(sweep, ChoiceSweep):
        choices = [str(c) if isinstance(c, (list, dict)) else c for c in sweep.list]
        if not choices:
            raise ConfigError(f"{where}: choice() is empty.")
        return CategoricalDistribution(choices)
    raise ConfigError(f"{where}: use interval(), int(interval()), range(), choice() or tag(log, ...).")


def make_sampler(config: dict[str, Any], distributions: Mapping[str, Any], n_existing: int) -> optuna.samplers.BaseSampler:
    """``{name: tpe, seed: 42}`` → ``TPESampler(seed=42)``. A seeded sampler resumes with
    ``seed + trials already in the study``, so it does not replay its first draws."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    import importlib.util

    options = dict(config)
    package = NEEDS.get(str(options.get("name", "")).lower())
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"study.sampler {options['name']} needs the package {package}: pip install {package}")
    if options.get("seed") is not None:
        options["seed"] = int(options["seed"]) + n_existing
    if str(options.get("name", "")).lower() == "grid":
        grid = {}
        for key, dist in distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                raise ConfigError(
                    f"study.sampler grid needs discrete values, but {key} is a continuous interval. "
                    "Use choice() or range() for it, or another sampler."
                )
        options.setdefault("search_space", grid)
    return _build(optuna.samplers, SAMPLERS, options, "study.sampler")


class Study:
    """One invocation of a study: its parent run, its trials, its results."""

    def __init__(self, hydra_context: HydraContext, config: DictConfig, conf: KmrunConf,
                 base: list[str], distributions: dict[str, Any], name: str, command: str) -> None:
        self.hydra_context, self.config, self.conf = hydra_context, config, conf
        self.settings: StudyConf = conf.study  # type: ignore[assignment]
        self.base, self.distributions, self.name, self.command = base, distributions, name, command
        self.conf_dir = _conf_dir(config)
        self.cells: list[Cell] = []
        self.composer = Composer(hydra_context, config, base)

    def compose(self, values: Mapping[str, Any], open_store: bool = True) -> JobSpec:
        lines = [f"{key}={_literal(value)}" for key, value in values.items()]
        job_cfg = self.composer(hydra_args(lines))
        return prepare(_without_hydra(job_cfg), as_typed(self.base) + lines, job_cfg.hydra.runtime.choices,
                       self.conf_dir, open_store=open_store)

    def check(self) -> None:
        """Compose a job at each end of every distribution: bad keys and types fail now."""
        make_pruner(self.settings.pruner)
        make_sampler(self.settings.sampler, self.distributions, 0)
        first, *_ = [self.compose(corner) for corner in _corners(self.distributions)]
        self.tracker = open_tracker(first.uri, first.experiment_name)
        self.spec = first
        self.redact = redactor(first)
        self.storage_url = self.settings.storage or _beside(first.uri)
        self.storage = open_storage(self.storage_url)

    def run(self) -> SweepOutcome:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = self.conf.objective.direction
        directions = directions if isinstance(directions, list) else [directions]
        try:
            existing = optuna.load_study(study_name=self.name, storage=self.storage)
            n_existing = len(existing.trials)
        except KeyError:
            n_existing = 0
        study = optuna.create_study(
            study_name=self.name, storage=self.storage, load_if_exists=True, directions=directions,
            sampler=make_sampler(self.settings.sampler, self.distributions, n_existing),
            pruner=make_pruner(self.settings.pruner),
        )
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(
                f"Study '{self.name}' in {hide_password(self.storage_url)} was created with directions "
                f"{[d.name.lower() for d in study.directions]}, not {directions}. Use another study.name."
            )
        self.study = study
        self._fail_stale()
        finished = self._finished()
        target = finished + self.settings.more if self.settings.more is not None else self.settings.n_trials
        grid_size = _grid_size(study.sampler)
        if grid_size is not None and target > grid_size:
            terminal.say(f"The grid sampler has {grid_size} points; the study stops there (not at {target}).")
            target = grid_size
        if finished:
            terminal.say(f"Study '{self.name}': {finished} trials already finished; running until it holds {target}.")
        parent = self.tracker.start(f"study {self.name}", {
            "kmrun.role": "parent", "kmrun.kind": "study", "kmrun.sweep": self.redact.text(self.command)[:5000],
            "optuna.study_name": self.name, "optuna.storage": hide_password(self.storage_url),
            "optuna.sampler": type(study.sampler).__name__, "optuna.pruner": type(study.pruner).__name__,
        })
        status = "KILLED"
        try:
            self._optimize(study, parent, target)
            status = "FAILED" if any(c.status == "FAILED" for c in self.cells) else "FINISHED"
        except KeyboardInterrupt:
            terminal.error(f"Interrupted: the study and its running trials are KILLED/FAILED. To resume:\n  {self.command}")
            raise
        finally:
            try:
                from . import results

                results.log_study(self, parent, with_plots=status != "KILLED")  # an interrupted study ends fast
            finally:
                self.tracker.finish(parent, status)
        elsewhere = self._count("RUNNING")  # this process's trials are all told by now
        outcome = SweepOutcome(self.cells, parent, self.command, target_met=self._finished() + elsewhere >= target)
        terminal.study_summary(self, outcome, target)
        return outcome

    def _finished(self) -> int:
        return self._count("COMPLETE", "PRUNED")

    def _count(self, *states: str) -> int:
        return len(self.study.get_trials(deepcopy=False, states=tuple(_state(s) for s in states)))

    def _fail_stale(self) -> int:
        """Trials (and MLflow runs) of dead processes: failed, never left RUNNING.

        A trial's owner is recorded right after it is asked for. A trial still without
        one after ``UNCLAIMED_SECONDS`` was asked for by a process that died at once."""
        import datetime

        import optuna
        from optuna.trial import TrialState

        failed = 0
        now = datetime.datetime.now()

        if hasattr(self.storage, "record_heartbeat"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        stale_runs = set(self.tracker.fail_stale_runs())
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = trial.user_attrs.get("mlflow_run_id")
            owner = trial.user_attrs.get("kmrun.owner")
            host, _, pid = str(owner or "").rpartition(":")
            dead = host == process_tags()["kmrun.host"] and pid and not _alive(int(pid))
            unclaimed = owner is None and trial.datetime_start is not None and (
                now - trial.datetime_start).total_seconds() > UNCLAIMED_SECONDS
            if dead or unclaimed:
                self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                failed += 1
                if run_id and run_id not in stale_runs:
                    self.tracker.finish(run_id, "FAILED")
        return failed

    def _optimize(self, study: optuna.Study, parent: str, target: int) -> None:
        limit = self.settings.max_failures if self.settings.max_failures is not None else max(target, 1)
        deadline = time.monotonic() + self.settings.timeout if self.settings.timeout else math.inf
        failures, stop = 0, False
        heartbeat = Heartbeat(self.storage)
        running: dict[Future[JobResult], tuple[Any, Cell]] = {}
        total = max(target - self._finished(), 0)
        try:
            with terminal.SweepProgress(total, self.conf, label="study") as progress, Pool(self.settings.n_jobs) as pool:
                while True:
                    while not stop and len(running) < pool.size and time.monotonic() < deadline:
                        if self._count("COMPLETE", "PRUNED", "RUNNING") >= target:
                            break  # reached, or being reached by running trials (ours or another process's)
                        with warnings.catch_warnings():
                            # kmrun records heartbeats itself; Optuna assumes only optimize() does
                            warnings.filterwarnings("ignore", message="Heartbeat of storage")
                            trial = study.ask(self.distributions)
                        if self._surplus(trial, target):
                            study.tell(trial, state=_state("FAIL"))
                            stop = True
                            break
                        owner = process_tags()
                        trial.set_user_attr("kmrun.owner", f"{owner['kmrun.host']}:{owner['kmrun.pid']}")
                        heartbeat.add(trial._trial_id)
                        cell = Cell(trial.number, [f"{k}={_literal(v)}" for k, v in trial.params.items()])
                        self.cells.append(cell)
                        spec = self._spec(trial, parent)
                        running[pool.submit(spec)] = (trial, cell)
                    if not running:
                        if stop or time.monotonic() >= deadline or self._finished() >= target:
                            break
                        if not self._count("RUNNING"):
                            continue  # another process's trial failed: ask for a new one
                        # Only other processes' trials are left: wait for them (or for them
                        # to turn out stale), so that this process ends with the study complete.
                        time.sleep(1.0)
                        self._fail_stale()
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        trial, cell = running.pop(future)
                        result = future.result()
                        self._tell(study, trial, cell, result)
                        heartbeat.remove(trial._trial_id)
                        failures += cell.status == "FAILED"
                        progress.update(cell)
                    if failures >= (limit if limit >= 1 else max(1.0, limit * target)):
                        stop = True
        except KeyboardInterrupt:
            for trial, cell in running.values():
                study.tell(trial, state=_state("FAIL"))
                cell.status = "KILLED"
            raise
        finally:
            heartbeat.stop()

    def _surplus(self, trial: optuna.Trial, target: int) -> bool:
        """Another process may have asked at the same time: only the first ``target``
        non-failed trials by number run, so the study never overshoots."""
        from optuna.trial import TrialState

        live = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        return sum(t.number <= trial.number for t in live) > target

    def _spec(self, trial: optuna.Trial, parent: str) -> JobSpec:
        spec = self.compose(trial.params)
        ref = TrialRef(self.storage_url, self.name, trial._trial_id, trial.number,
                       tuple(sorted(self.settings.pruner.items())))
        dists = {k: repr(d) for k, d in self.distributions.items()}
        return replace(spec, parent_run_id=parent, run_name=f"trial {trial.number}", trial=ref, tags={
            "kmrun.role": "child", "kmrun.kind": "trial", "optuna.study_name": self.name,
            "optuna.trial_number": str(trial.number), "optuna.sampler": type(self.study.sampler).__name__,
            "optuna.distributions": json.dumps(dists)[:5000],
        })

    def _tell(self, study: optuna.Study, trial: optuna.Trial, cell: Cell, result: JobResult) -> None:
        cell.run_id, cell.metrics, cell.objective, cell.error = result.run_id, result.metrics, result.objective, result.error
        cell.status = result.status
        try:
            if result.status == "FINISHED":
                study.tell(trial, result.objective)
            else:
                study.tell(trial, state=_state(TELL[result.status]))
        except RuntimeError as err:
            # GridSampler calls study.stop() when its grid is done, which only optimize()
            # allows; the trial's state is stored before that, so nothing is lost.
            if "Study.stop" not in str(err):
                raise


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


def _corners(distributions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every distribution at its low end, then at its high end."""
    from optuna.distributions import CategoricalDistribution

    def end(dist: Any, last: bool) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[-1 if last else 0]
        return dist.high if last else dist.low

    return [{k: end(d, last) for k, d in distributions.items()} for last in (False, True)]


def _beside(uri: str) -> str:
    """The default storage: ``optuna.db`` next to an SQLite MLflow store, else in the cwd."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"

