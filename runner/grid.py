"""A grid: the cells of a sweep, as a job source for the engine.

The grid comes from the command line's sweep expressions and ``sweep.params``, in
Hydra's sweep grammar. Every cell is composed and checked before anything runs. A cell
that already has a FINISHED run of the same config hash in the experiment is skipped,
so running the same command again resumes the sweep.

Processes started on the same grid share its cells, each cell once; who runs which is
the ``claims``' business (the tracking store's locks, or an Optuna storage with
``sweep.storage``). A cell whose worker process died runs again, once.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cells import JobComposer, spec_of
from .claims import BoardClaims, Claims, StoreClaims
from .compose import as_typed
from .engine import Job
from .errors import ConfigError, KmrunError, WorkerLost, after
from .job import JobSpec
from .params import first_of
from .records import JobResult, Outcome, Status

if TYPE_CHECKING:

    from hydra.core.override_parser.types import Override

    from .board import Board
    from .compose import Composer
    from .schema import KmrunConf
    from .tracking import RunStore

log = logging.getLogger(__name__)

LOST_RETRIES = 1  # runs again of a cell whose worker process died (an OOM kill may recur)
NOT_SWEEPABLE = ("mlflow", "sweep", "study", "objective", "metrics", "verbose", "cache",
                 "kedro.project_path", "kedro.env", "hydra")


def check_sweepable(key: str) -> None:
    """Keys one sweep must share cannot be swept."""
    for prefix in NOT_SWEEPABLE:
        if key == prefix or key.startswith(prefix + "."):
            raise ConfigError(
                f"'{key}' cannot be swept: one sweep shares one {prefix} setting. "
                "Sweep params.* keys or config groups (model=a,b), or run separate sweeps."
            )


def split(composer: Composer, lines: list[str]) -> tuple[list[str], dict[str, Override]]:
    """The overrides every job shares, and the sweep expressions by key; a later line
    for the same key wins (the command line comes after the YAML)."""
    latest: dict[str, Override] = {}
    for override in composer.parse(lines):
        latest[override.get_key_element().lstrip("+~")] = override
    base = [as_typed([str(o.input_line)])[0] for o in latest.values() if not o.is_sweep_override()]
    sweeps = {key: o for key, o in latest.items() if o.is_sweep_override()}
    for key in sweeps:
        check_sweepable(key)
    return base, sweeps


def _inactive_files(composer: Composer, arguments: list[str]) -> list[str]:
    """The study or sweep files the command names that hold nothing but comments."""
    found = []
    for argument in arguments:
        group, _, name = argument.lstrip("+~").partition("=")
        path = composer.config_dir / group / f"{name}.yaml"
        if group in ("study", "sweep") and path.is_file() and not any(
                line.strip() and not line.lstrip().startswith("#") for line in path.read_text().splitlines()):
            found.append(f"{composer.config_dir.name}/{group}/{name}.yaml")
    return found


def expand(composer: Composer, arguments: list[str], yaml_grid: dict[str, Any]) -> tuple[list[str], list[Outcome]]:
    """The shared overrides, and one outcome (NOT_STARTED) per cell of the grid."""
    from_yaml = [f"{k}={_as_sweep(v)}" for k, v in yaml_grid.items()]
    base, sweeps = split(composer, from_yaml + list(arguments))
    axes: dict[str, list[str]] = {}
    for override in sweeps.values():
        typed_key = as_typed([str(override.input_line)])[0].split("=", 1)[0]
        if not override.is_discrete_sweep():
            raise ConfigError(
                f"{as_typed([str(override.input_line)])[0]}: a grid needs discrete values; "
                "interval() is for Optuna studies (+study=NAME). Use a,b,c, range() or choice()."
            )
        axes[typed_key] = [f"{typed_key}={value}" for value in override.sweep_string_iterator()]
    if not axes:
        inactive = _inactive_files(composer, arguments)
        if inactive:
            raise ConfigError(
                f"Empty sweep: {inactive[0]} holds only comments, so it sets no study and no sweep. Uncomment its "
                "study: section (or write one), then run the same command again.")
        raise ConfigError(
            "Empty sweep: -m needs at least one sweep expression, such as params.model.C=0.1,1,10, "
            "or a sweep file (+sweep=NAME) or a study (+study=NAME)."
        )
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ConfigError(f"Empty sweep: {', '.join(empty)} expands to no value. Check its range().")
    grid = itertools.product(*axes.values())
    return base, [Outcome(i, list(values)) for i, values in enumerate(grid)]


class Grid:
    """A grid's cells as a job source: composed and checked up front, resumable."""

    def __init__(self, composer: Composer, conf: KmrunConf, base: list[str], cells: list[Outcome]) -> None:
        self.conf, self.base, self.outcomes = conf, base, cells
        self.specs: dict[int, JobSpec] = {}
        self.secrets: set[str] = set()  # every cell's (``check``): one redactor for what the sweep shows
        self._hashes: list[str] = []  # every cell's config hash (``check``)
        self._fingerprints: set[str] = set()  # every cell's code, data and environment (``check``)
        self._compose = JobComposer(composer, base)
        self._conf_dir, self._base_dir = composer.config_dir, composer.base_dir
        self._todo: list[Outcome] = []
        self.board: Board | None = None  # with sweep.storage: the cells, shared through Optuna
        self._lost: dict[int, int] = {}  # cell index -> times its worker died under it
        self.superseded: str | None = None  # this grid's parent on other code, data or environment, if any
        self.stale: list[str] = []  # what changed since the cells' finished runs (``resume``)
        self.since = datetime.datetime.now()  # what a board's trials ended after, this store has not seen
        self.taken = 0  # cells other processes ran while this one ran
        self._tracker: RunStore | None = None  # the store, once started
        self._claims: Claims | None = None  # who runs which cell, once started

    @property
    def tracker(self) -> RunStore:
        """The store the grid runs on (``check`` and ``resume`` come before ``start``)."""
        return after("Grid.start()", self._tracker)

    @property
    def claims(self) -> Claims:
        return after("Grid.start()", self._claims)

    def check(self, open_store: bool, keep: bool = True) -> None:
        """Compose and check every cell before any runs; report every distinct problem once.
        Without ``keep`` (a dry run) only the first cell's spec is kept: what the grid
        needs of the others (``key``, ``fingerprint``, ``secrets``) is kept as it goes."""
        problems: dict[str, str] = {}
        self.specs, self.secrets, self._hashes, self._fingerprints = {}, set(), [], set()
        for cell in self.outcomes:
            overrides = self.base + cell.swept
            try:
                spec = spec_of(self._compose, cell.swept, overrides, self._conf_dir, open_store, self._base_dir)
                self._hashes.append(spec.config_hash)
                if spec.fingerprint is not None:
                    self._fingerprints.add(spec.fingerprint.value)
                self.secrets.update(spec.redact.values)
                if keep or not self.specs:
                    self.specs[cell.index] = spec
            except KmrunError as err:
                for line in str(err).splitlines():  # one line per bad key, not per value
                    problems.setdefault(line.split(" (", 1)[0], line)
        if problems:
            lines = sorted(problems.values(), key=lambda line: line.startswith(("Fix", "...")))
            fixes = [line for line in lines if line.startswith("Fix")]
            raise ConfigError("\n".join(first_of([line for line in lines if line not in fixes]) + fixes[:1]))

    @property
    def first(self) -> JobSpec:
        return self.specs[self.outcomes[0].index]

    @property
    def key(self) -> str:
        """The grid's identity: the config hashes of its cells."""
        hashes = sorted(self._hashes)
        return hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]

    def resume(self, tracker: RunStore, rerun: bool) -> tuple[int, str | None]:
        """Mark the cells this same grid already FINISHED, on the same code and data, SKIPPED
        (one query, whatever the store's size; a cell another grid finished is found when
        it is claimed). Returns how many, and the parent run this grid had before (None for
        a new one). ``stale`` says what changed for cells that ran before but run again."""
        self._todo, self.stale = list(self.outcomes), []
        self.since = datetime.datetime.now()  # what a board's trials ended after, this store has not seen
        if rerun:
            return 0, None
        done: dict[str, list[Any]] = {}
        for run in tracker.search("tags.`kmrun.role` = 'child' and attributes.status = 'FINISHED' and "
                                  f"tags.`kmrun.sweep_key` = '{self.key}'"):
            done.setdefault(run.data.tags.get("kmrun.config_hash", ""), []).append(run)
        self._todo = []
        for cell in self.outcomes:
            spec = self.specs[cell.index]
            runs = done.get(spec.config_hash, [])
            run = next((r for r in runs if spec.fingerprint is None or not spec.fingerprint.changed(r.data.tags)), None)
            if run is None:
                if runs and spec.fingerprint is not None:
                    self.stale += [c for c in spec.fingerprint.changed(runs[0].data.tags) if c not in self.stale]
                self._todo.append(cell)
                continue
            cell.status, cell.run_id, cell.metrics = Status.SKIPPED, run.info.run_id, dict(run.data.metrics)
            cell.objective = objective_from(self.conf, cell.metrics)
        # a parent holds one version of the code, data and environment: another version gets a new parent
        previous = tracker.search(f"tags.`kmrun.role` = 'parent' and tags.`kmrun.sweep_key` = '{self.key}' and "
                                  f"tags.`kmrun.sweep_fingerprint` = '{self.fingerprint}'", max_results=1)
        if not previous:
            older = tracker.search(f"tags.`kmrun.role` = 'parent' and tags.`kmrun.sweep_key` = '{self.key}'",
                                   max_results=1)
            self.superseded = older[0].info.run_id if older else None
        return len(self.outcomes) - len(self._todo), (previous[0].info.run_id if previous else None)

    @property
    def fingerprint(self) -> str:
        """The code, data and environment of the grid's cells, as one value (cells whose catalog
        reads runtime params may each read other files)."""
        values = sorted(self._fingerprints)
        return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]

    def start(self, tracker: RunStore, parent: str, sweep_dir: Path) -> None:
        """Give every cell to run its child-run settings and its own output directory."""
        self._tracker, self.taken = tracker, 0
        for cell in self._todo:
            self.specs[cell.index] = replace(
                self.specs[cell.index],
                parent_run_id=parent,
                run_name=cell.label,
                output_dir=str(sweep_dir / str(cell.index)),
                tags={"kmrun.role": "child", "kmrun.cell": str(cell.index), "kmrun.sweep_key": self.key},
            )
        if self.board is not None:
            self._claims = BoardClaims(self.board, tracker, self.specs, self._todo, self._settle)
        else:
            self._claims = StoreClaims(tracker, self.specs, self._todo, self.conf.sweep.rerun, self._settle)

    def share(self, url: str) -> None:
        """Share the cells through the Optuna storage at ``url`` (``sweep.storage``)."""
        from .board import Board

        self.board = Board(url, self.key, self.since)

    # the engine's Source protocol
    @property
    def planned(self) -> int:
        return len(self._todo)

    def next(self) -> Job | None:
        """The next cell no other process has taken; its child run is started here. A cell
        another process runs now is waited for (``wait_outside``), not skipped."""
        return self.claims.take()

    def _settle(self, cell: Outcome, run: Any) -> None:
        """Another process (or sweep) ended the cell, in ``run`` (None: its run is unknown)."""
        cell.status, self.taken = Status.SKIPPED, self.taken + 1
        if run is not None:
            cell.run_id, cell.metrics = run.info.run_id, dict(run.data.metrics)
            cell.objective = objective_from(self.conf, cell.metrics) if run.info.status == "FINISHED" else None

    def exhausted(self) -> bool:
        return not self.claims.pending()  # every cell known up front is done, or ours

    def wait_outside(self) -> None:
        """Only other processes' cells are left: wait for them to end. A cell whose process
        died (on this host by its PID; on another, through PostgreSQL, or the board's
        heartbeats) comes back to be run here."""
        time.sleep(1.0)
        self.claims.poll()

    def record(self, job: Job, result: JobResult) -> None:
        if not result.run_id and job.spec.run_id:  # its worker died before it could end the run
            result.run_id = job.spec.run_id
            if self.tracker.client.get_run(job.spec.run_id).info.status == "RUNNING":
                self.tracker.finish(job.spec.run_id, "FAILED")
        index = job.outcome.index
        lost = isinstance(result.error, WorkerLost) and self._lost.get(index, 0) < LOST_RETRIES
        twins = self.claims.end(job, result.status, lost)  # cells of the same config this job settled
        if lost:
            self._lost[index] = self._lost.get(index, 0) + 1
            log.warning("Cell %s: its worker process died (killed, or out of memory); it runs again.",
                        job.outcome.label)
            job.outcome.status = Status.NOT_STARTED
            return
        job.outcome.take(result)
        for twin in twins:
            twin.status, twin.run_id, twin.metrics = Status.SKIPPED, result.run_id, dict(result.metrics)
            twin.objective = job.outcome.objective

    def abandon(self, job: Job) -> None:
        job.outcome.status = Status.KILLED
        self.claims.abandon(job)
        # its worker may have been stopped before its job could end the run
        if job.spec.run_id and self.tracker.client.get_run(job.spec.run_id).info.status == "RUNNING":
            self.tracker.finish(job.spec.run_id, "KILLED")

    def close(self) -> None:
        if self._claims is not None:
            self._claims.close()
        elif self.board is not None:
            self.board.close()


def objective_from(conf: KmrunConf, metrics: dict[str, float]) -> Any:
    metric = conf.objective.metric
    if isinstance(metric, list):
        return [metrics.get(m) for m in metric]
    return metrics.get(metric) if metric else None


def _as_sweep(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
