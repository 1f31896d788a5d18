"""kmrun's sweeper: expand a grid, run its jobs under one parent MLflow run, resume.

Hydra calls ``run_sweep`` through the thin plugin in ``hydra_plugins/kmrun_sweeper``.
Jobs are composed once here (cheaply, without Hydra's per-job launcher), checked all
at once before anything runs, and handed to a ``Pool``: the one seam that decides
where a job runs. Workers take the next job as soon as they are free, so a slow job
never holds idle workers back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import sys
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import terminal
from .compose import as_typed, hydra_args
from .errors import ConfigError, KmrunError
from .job import JobResult, JobSpec, open_tracker, prepare, redactor
from .pool import Pool
from .schema import KmrunConf, parse

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from hydra.types import HydraContext
    from omegaconf import DictConfig


NOT_SWEEPABLE = ("mlflow", "sweep", "study", "objective", "metrics", "verbose",
                 "kedro.project_path", "kedro.env", "hydra")


@dataclass
class Cell:
    """One job of a sweep and how it ended."""

    index: int
    swept: list[str]  # the swept overrides of this cell, as typed
    spec: JobSpec | None = None
    status: str = "PENDING"  # FINISHED | FAILED | KILLED | SKIPPED | NOT_STARTED
    run_id: str | None = None
    objective: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        return " ".join(o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] for o in self.swept)


@dataclass
class SweepOutcome:
    cells: list[Cell]
    parent_run_id: str | None
    command: str
    dry_run: bool = False
    target_met: bool | None = None  # a study: whether it holds n_trials finished trials

    @property
    def exit_code(self) -> int:
        if self.dry_run or self.target_met:
            return 0
        if self.target_met is False:
            return 1
        return 0 if all(c.status in ("FINISHED", "SKIPPED") for c in self.cells) else 1


outcomes: list[SweepOutcome] = []  # what the CLI reads back after Hydra returns


def run_sweep(hydra_context: HydraContext, config: DictConfig, arguments: list[str]) -> SweepOutcome:
    """Expand, check, run and summarise one sweep."""
    conf = parse(_without_hydra(config))
    command = "kmrun -m " + " ".join(  # the command that resumes: the same, minus a forced rerun
        shlex.quote(a) for a in as_typed(sys.argv[1:]) if a not in ("-m", "--multirun") and not a.startswith("sweep.rerun=")
    )
    if conf.study is not None:
        from .study import run_study

        outcome = run_study(hydra_context, config, arguments, conf, command)
        outcomes.append(outcome)
        return outcome
    base, cells = expand(hydra_context, arguments, conf.sweep.params)
    _compose_all(hydra_context, config, base, cells, open_store=not conf.sweep.dry_run)
    if conf.sweep.dry_run:
        terminal.dry_run(cells)
        outcome = SweepOutcome(cells, None, command, dry_run=True)
    else:
        outcome = Sweep(conf, cells, Path(str(config.hydra.sweep.dir)).resolve(), command).run()
    outcomes.append(outcome)
    return outcome


def expand(
    hydra_context: HydraContext, arguments: list[str], yaml_grid: dict[str, Any]
) -> tuple[list[str], list[Cell]]:
    """The overrides every job shares, and the grid's cells, from the command line and
    ``sweep.params``; for a key in both, the command line wins."""
    from_yaml = [f"{k}={_as_sweep(v)}" for k, v in yaml_grid.items()]
    latest: dict[str, Override] = {}  # one entry per key: the command line comes last and wins
    for override in _parse(hydra_context, hydra_args(from_yaml) + list(arguments)):
        latest[override.get_key_element().lstrip("+~")] = override
    axes: dict[str, list[str]] = {}
    base = []
    for override in latest.values():
        if not override.is_sweep_override():
            base.append(override.input_line)
            continue
        key = override.get_key_element()
        _check_sweepable(key.lstrip("+~"))
        if not override.is_discrete_sweep():
            raise ConfigError(
                f"{as_typed([override.input_line])[0]}: a grid needs discrete values; "
                "interval() is for Optuna studies (+study=NAME). Use a,b,c, range() or choice()."
            )
        axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
    if not axes:
        raise ConfigError(
            "Empty sweep: -m needs at least one sweep expression, such as params.model.C=0.1,1,10, "
            "or a sweep file (+sweep=NAME) or a study (+study=NAME)."
        )
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ConfigError(f"Empty sweep: {', '.join(as_typed(empty))} expands to no value. Check its range().")
    grid = itertools.product(*axes.values())
    return base, [Cell(i, as_typed(list(values))) for i, values in enumerate(grid)]


class Composer:
    """Job configs, cheaply: Hydra composes the overrides every job shares once; a job
    that only sets config values (``params.model.C=0.1``) is that config with its values
    set. A job that picks config groups (``model=random_forest``) goes through Hydra."""

    def __init__(self, hydra_context: HydraContext, config: DictConfig, base: list[str]) -> None:
        from .schema import SECTIONS

        self.hydra_context, self.config, self.base, self.sections = hydra_context, config, base, SECTIONS
        self.template = hydra_context.config_loader.load_sweep_config(config, list(base))

    def __call__(self, lines: list[str]) -> DictConfig:
        from omegaconf import OmegaConf

        overrides = _parse(self.hydra_context, lines)
        if not all(self._is_value(o) for o in overrides):
            return self.hydra_context.config_loader.load_sweep_config(self.config, self.base + lines)
        job = self.template.copy()
        for override in overrides:
            OmegaConf.update(job, override.key_or_group, override.value(), merge=True, force_add=True)
        return job

    def _is_value(self, override: Override) -> bool:
        key = override.key_or_group
        return "." in key and key.split(".", 1)[0] in self.sections and not override.is_delete()


def _compose_all(
    hydra_context: HydraContext, config: DictConfig, base: list[str], cells: list[Cell], open_store: bool
) -> None:
    """Compose and check every job before any runs; report every distinct problem at once."""
    problems: dict[str, str] = {}
    conf_dir = _conf_dir(config)
    compose = Composer(hydra_context, config, base)
    for cell in cells:
        job_cfg = compose(hydra_args(cell.swept))
        try:
            cell.spec = prepare(
                _without_hydra(job_cfg),
                as_typed(base) + cell.swept,
                job_cfg.hydra.runtime.choices,
                conf_dir,
                open_store=open_store,
            )
        except KmrunError as err:
            for line in str(err).splitlines():  # one line per bad key, not per value
                problems.setdefault(line.split(" (", 1)[0], line)
    if problems:
        raise ConfigError("\n".join(sorted(problems.values(), key=lambda line: line.startswith("Fix"))))


class Sweep:
    """The lifecycle of one sweep's parent run and its children."""

    def __init__(self, conf: KmrunConf, cells: list[Cell], sweep_dir: Path, command: str) -> None:
        first = cells[0].spec
        assert first is not None
        self.conf, self.cells, self.sweep_dir, self.command = conf, cells, sweep_dir, command
        self.tracker = open_tracker(first.uri, first.experiment_name)
        self.redact = redactor(first)
        self.key = hashlib.sha256(json.dumps(sorted(c.spec.config_hash for c in cells if c.spec)).encode()).hexdigest()[:16]

    def run(self) -> SweepOutcome:
        self.tracker.fail_stale_runs()
        todo = self._skip_finished()
        parent = self._parent()
        for cell in todo:
            assert cell.spec is not None
            cell.spec = replace(
                cell.spec,
                parent_run_id=parent,
                run_name=cell.label,
                output_dir=str(self.sweep_dir / str(cell.index)),
                tags={"kmrun.role": "child", "kmrun.cell": str(cell.index), "kmrun.sweep_key": self.key},
            )
        status = "KILLED"
        try:
            self._launch(todo)
            status = "FAILED" if any(c.status == "FAILED" for c in self.cells) else "FINISHED"
        except KeyboardInterrupt:
            terminal.error(f"Interrupted: the sweep and its running job are KILLED. To resume:\n  {self.command}")
            raise
        finally:
            for cell in self.cells:
                if cell.status == "PENDING":
                    cell.status = "NOT_STARTED"
            try:
                self._summarise(parent, plot=status != "KILLED")  # an interrupted sweep ends fast
            finally:
                self.tracker.finish(parent, status)
        outcome = SweepOutcome(self.cells, parent, self.command)
        terminal.sweep_summary(self.conf, outcome, self.tracker.uri)
        return outcome

    def _skip_finished(self) -> list[Cell]:
        """Cells with a FINISHED child of the same config hash in this experiment are done."""
        if self.conf.sweep.rerun:
            return list(self.cells)
        done = {
            run.data.tags.get("kmrun.config_hash"): run
            for run in self.tracker.search("tags.`kmrun.role` = 'child' and attributes.status = 'FINISHED'")
        }
        todo = []
        for cell in self.cells:
            run = done.get(cell.spec.config_hash if cell.spec else None)
            if run is None:
                todo.append(cell)
                continue
            cell.status, cell.run_id, cell.metrics = "SKIPPED", run.info.run_id, dict(run.data.metrics)
            cell.objective = _objective(self.conf, cell.metrics)
        if len(todo) < len(self.cells):
            terminal.say(f"{len(self.cells) - len(todo)} skipped (already FINISHED), {len(todo)} to run.")
        return todo

    def _parent(self) -> str:
        """The parent run: the one this same sweep used before (re-opened), else a new one."""
        if not self.conf.sweep.rerun:
            previous = self.tracker.search(
                f"tags.`kmrun.role` = 'parent' and tags.`kmrun.sweep_key` = '{self.key}'", max_results=1
            )
            if previous:
                run_id = previous[0].info.run_id
                self.tracker.reopen(run_id)
                return str(run_id)
        definition = "\n".join(c.label for c in self.cells)
        command = self.redact.text(self.command)
        tags = {"kmrun.role": "parent", "kmrun.sweep_key": self.key, "kmrun.sweep": command[:5000]}
        run_id = self.tracker.start(f"sweep {self.cells[0].spec.run_name or ''}".strip(), tags)
        self.tracker.log_text(run_id, self.redact.text(command + "\n\n" + definition + "\n"), "sweep.txt")
        return run_id

    def _launch(self, todo: list[Cell]) -> None:
        limit = self.conf.sweep.max_failures
        failures = 0
        with terminal.SweepProgress(len(self.cells), self.conf, label="sweep") as progress, Pool(self.conf.sweep.n_jobs) as pool:
            for cell in self.cells:
                if cell.status == "SKIPPED":
                    progress.update(cell)
            pending: dict[Future[JobResult], Cell] = {}
            queue = iter(todo)
            while True:
                while len(pending) < pool.size and not _exceeded(limit, failures, len(todo)):
                    cell = next(queue, None)
                    if cell is None:
                        break
                    assert cell.spec is not None
                    pending[pool.submit(cell.spec)] = cell
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = pending.pop(future)
                    _record(cell, future.result())
                    failures += cell.status == "FAILED"
                    progress.update(cell)

    def _summarise(self, parent: str, plot: bool) -> None:
        from . import results

        results.log_parent(self.tracker, parent, self.conf, self.cells, self.redact, plot)


def _record(cell: Cell, result: JobResult) -> None:
    cell.status, cell.run_id, cell.metrics = result.status, result.run_id, result.metrics
    cell.objective, cell.error = result.objective, result.error


def _exceeded(limit: float | None, failures: int, total: int) -> bool:
    if limit is None:
        return False
    return failures >= limit if limit >= 1 else total > 0 and failures / total > limit


def _objective(conf: KmrunConf, metrics: dict[str, float]) -> Any:
    metric = conf.objective.metric
    if isinstance(metric, list):
        return [metrics.get(m) for m in metric]
    return metrics.get(metric) if metric else None


def _parse(hydra_context: HydraContext, lines: list[str]) -> list[Override]:
    """Hydra's own parser, one line at a time, so an error names its override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create(config_loader=hydra_context.config_loader)
    parsed = []
    for line in lines:
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as err:
            typed = as_typed([line])[0]
            raise ConfigError(
                f"Bad override or sweep expression '{typed}': {str(err).strip().splitlines()[0]}\n"
                "Write values as a,b,c · range(START,STOP[,STEP]) · choice(a,b) · interval(LOW,HIGH) · "
                "int(interval(LOW,HIGH)) · tag(log, interval(LOW,HIGH)); quote them for the shell."
            ) from None
    return parsed


def _as_sweep(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_sweepable(key: str) -> None:
    for prefix in NOT_SWEEPABLE:
        if key == prefix or key.startswith(prefix + "."):
            raise ConfigError(
                f"'{key}' cannot be swept: one sweep shares one {prefix} setting. "
                "Sweep params.* keys or config groups (model=a,b), or run separate sweeps."
            )


def _conf_dir(config: DictConfig) -> Path:
    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and str(source.path).startswith("file://"):
            return Path(str(source.path)[len("file://") :])
    return Path.cwd() / "conf"


def _without_hydra(config: DictConfig) -> DictConfig:
    from omegaconf import OmegaConf

    return OmegaConf.masked_copy(config, [str(k) for k in config if k != "hydra"])
