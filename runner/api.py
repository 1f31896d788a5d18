"""kmrun's public entry points: ``run`` one job, ``sweep`` a grid or a study.

Each call composes the config (``compose``), checks it, and hands its jobs to the
engine; it returns plain records (``records``) and prints nothing unless ``echo`` is
set. Calls can repeat in one process: Hydra's state is held only during a call, and the
project's parameters and git state are read again at the start of each one
(``runtime``). The CLI is a thin layer over these two functions.
"""

from __future__ import annotations

import shlex
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import patience, runtime
from .errors import ConfigError, JobFailed, KmrunError, StoreUnavailable
from .redact import Redactor

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .compose import Composer
    from .engine import Source
    from .job import JobSpec
    from .models import BestModel
    from .records import JobResult, Objective, Outcome, SweepOutcome
    from .schema import KmrunConf, RayConf
    from .terminal import SweepProgress
    from .tracking import Tracker


def run(
    overrides: list[str] | None = None,
    *,
    config_dir: str | Path | None = None,
    config_name: str = "kmrun",
    search_dir: str | Path | None = None,
    echo: bool = False,
    verbose: bool = False,
) -> JobResult:
    """Run one experiment, as ``kmrun OVERRIDES...`` would, and return its result.

    Raises ``KmrunError`` for bad input (nothing is run), and its subclass ``JobFailed``
    when the pipeline fails (or ``MetricError`` when the objective is missing): the MLflow
    run then exists and is FAILED. ``echo`` prints a header and a summary; ``verbose``
    lets Kedro's INFO log through. ``config_dir``, ``config_name`` and ``search_dir`` are
    Hydra's ``-cp``, ``-cn`` and ``-cd``.
    """
    from . import job, terminal
    from .compose import Composer, choices_of

    overrides = list(overrides or [])
    runtime.current().refresh()
    with terminal.quiet_unless(verbose), Composer(_path(config_dir), config_name, _path(search_dir)) as composer:
        sweeps = [str(o.input_line) for o in composer.parse(overrides) if o.is_sweep_override()]
        if sweeps:
            raise ConfigError(f"'{sweeps[0].lstrip('+')}' is a sweep: run it with kmrun -m (or runner.sweep), "
                              "or quote the value to pass it as one string.")
        cfg = composer.compose(overrides)
        spec = job.prepare(cfg, overrides, choices_of(cfg), composer.config_dir, base_dir=composer.base_dir)
        verbose = verbose or spec.conf.verbose
    with terminal.quiet_unless(verbose):
        # runs this host's killed processes left RUNNING: the next kmrun of any kind ends them
        runtime.current().tracker(spec.uri, spec.experiment_name).fail_stale_runs()
        if echo:
            project = runtime.current().project(spec.conf.kedro.project_path, spec.conf.kedro.env)
            terminal.header(spec.experiment_name, spec.conf.kedro.pipeline, project.env_name, spec.conf.kedro.tags,
                            spec.uri)
        result = job.execute(spec)
    if echo:
        terminal.run_summary(result, spec.run_name, _objective(spec.conf), spec.uri, spec.experiment_name)
    if result.error is not None:
        error = result.error
        raise type(error)(f"{error}\nThe run {result.run_id} is {result.status}; "
                          "its traceback is the artifact traceback.txt.")
    return result


def sweep(
    overrides: list[str] | None = None,
    *,
    config_dir: str | Path | None = None,
    config_name: str = "kmrun",
    search_dir: str | Path | None = None,
    echo: bool = False,
    verbose: bool = False,
) -> SweepOutcome:
    """Run a sweep, as ``kmrun -m OVERRIDES...`` would: a grid, or an Optuna study when
    the config selects one (``+study=NAME``). Returns every job's outcome; a failed job
    does not raise (see ``SweepOutcome.exit_code``). Raises ``KmrunError`` for bad input
    (nothing is run) and ``KeyboardInterrupt`` when interrupted (runs end KILLED)."""
    from . import terminal
    from .compose import Composer, choices_of
    from .grid import split
    from .schema import parse

    overrides = list(overrides or [])
    runtime.current().refresh()
    command = resume_command(overrides, config_dir, config_name)
    with terminal.quiet_unless(verbose), Composer(_path(config_dir), config_name, _path(search_dir)) as composer:
        base, _ = split(composer, overrides)
        cfg = composer.compose(base)
        conf = parse(cfg)
        verbose = verbose or conf.verbose
        patience.configure(conf.store_patience)
        with terminal.quiet_unless(verbose):
            if conf.study is not None:
                name = conf.study.name or str(choices_of(cfg).get("study") or "study")
                return _study(composer, conf, name, overrides, command, echo, verbose)
            return _grid(composer, conf, overrides, command, echo, verbose)


def _grid(composer: Composer, conf: KmrunConf, overrides: list[str], command: str, echo: bool,
          verbose: bool) -> SweepOutcome:
    from . import terminal
    from .grid import Grid, expand
    from .records import Status, SweepOutcome

    base, cells = expand(composer, overrides, conf.sweep.params)
    grid = Grid(composer, conf, base, cells)
    grid.check(open_store=not conf.sweep.dry_run, keep=not conf.sweep.dry_run)
    redact = Redactor(grid.secrets)
    for cell in grid.outcomes:  # what is shown and logged of each cell; its spec keeps the values
        cell.swept = [redact.override(o) for o in cell.swept]
    outcome = SweepOutcome("grid", grid.outcomes, _objective(conf), None, _shown(command, overrides, redact),
                           grid.first.uri, dry_run=conf.sweep.dry_run)
    if conf.sweep.dry_run:
        if echo:
            terminal.dry_run(outcome)
        return outcome
    ray = _on_ray(grid.first, composer.base_dir, {"mlflow.tracking_uri": grid.first.uri,
                                                  "sweep.storage": conf.sweep.storage or ""}, verbose)
    gpus = _gpu_slots(conf)
    jobs_dir = sweep_dir(conf, composer.base_dir)
    tracker = runtime.current().tracker(grid.first.uri, grid.first.experiment_name)
    tracker.fail_stale_runs()
    skipped, previous = grid.resume(tracker, conf.sweep.rerun)
    if conf.sweep.storage:
        grid.share(conf.sweep.storage)
    if skipped or grid.stale:
        why = f": {' and '.join(grid.stale)} changed since the finished runs" if grid.stale else ""
        if grid.stale == ["unrecorded"]:
            why = ": the finished runs did not record the code and data they ran on"
        _note(outcome, f"{skipped} skipped (already FINISHED), {grid.planned} to run{why}.", echo)
    if previous is not None:
        tracker.reopen(previous)
        tracker.log(previous, tags={"kmrun.sweep": redact.text(outcome.command)[:5000]})  # the latest: what join runs
        parent_id = previous
    else:
        tags = {"kmrun.role": "parent", "kmrun.kind": "grid", "kmrun.sweep_key": grid.key,
                "kmrun.sweep_fingerprint": grid.fingerprint, "kmrun.sweep": outcome.command[:5000]}
        if grid.superseded:
            tags["kmrun.supersedes"] = grid.superseded  # the same grid's parent on other code, data or environment
            _note(outcome, f"A new parent run: the grid's earlier parent {grid.superseded[:12]} holds runs of other "
                           "code, data or environment.", echo)
        parent_id = tracker.start(f"sweep {grid.first.run_name or ''}".strip(), tags)
        definition = "\n".join(c.label for c in grid.outcomes)
        tracker.log_text(parent_id, redact.text(outcome.command + "\n\n" + definition + "\n"), "sweep.txt")
    outcome.parent_run_id = parent_id
    grid.start(tracker, parent_id, jobs_dir)
    _warm_models(conf, conf.sweep.n_jobs)
    try:
        return _execute(grid, tracker, conf.sweep.n_jobs, verbose, conf.sweep.max_failures, outcome, redact, echo,
                        shared=[grid.specs[c.index] for c in grid.outcomes if c.status is Status.NOT_STARTED],
                        jobs_dir=jobs_dir, best_model=_best_model(conf, jobs_dir, conf.sweep.register_best),
                        ray=ray, gpus=gpus)
    finally:
        grid.close()


def _study(composer: Composer, conf: KmrunConf, name: str, overrides: list[str], command: str, echo: bool,
           verbose: bool) -> SweepOutcome:
    from .records import SweepOutcome
    from .space import search_space
    from .study import Study

    settings = conf.study
    assert settings is not None  # sweep() calls this for a config with a study
    base, space = search_space(composer, settings.search_space, overrides)
    study = Study(composer, conf, base, space, name)
    study.check()
    ray = _on_ray(study.first, composer.base_dir, {"mlflow.tracking_uri": study.first.uri,
                                                   "study.storage": study.storage_url}, verbose)
    gpus = _gpu_slots(conf)
    jobs_dir = sweep_dir(conf, composer.base_dir)
    tracker = runtime.current().tracker(study.first.uri, study.first.experiment_name)
    redact = study.first.redact
    outcome = SweepOutcome("study", study.outcomes, _objective(conf), None, _shown(command, overrides, redact),
                           study.first.uri)
    try:
        for note in study.begin(tracker):
            _note(outcome, note, echo)
        parent_id = tracker.start(f"study {study.name}", {k: redact.text(v) for k, v in
                                                          study.parent_tags(outcome.command).items()})
        outcome.parent_run_id = parent_id
        study.start(parent_id, jobs_dir)
        best = settings.export_best
        export = composer.config_dir / "experiment" / f"{best}.yaml" if best else None

        def summarise() -> None:
            outcome.study = study.summary(export)

        _warm_models(conf, settings.n_jobs)
        return _execute(study, tracker, settings.n_jobs, verbose, settings.max_failures, outcome, redact, echo,
                        summarise, shared=study.corners, jobs_dir=jobs_dir,
                        best_model=_best_model(conf, jobs_dir, settings.register_best), ray=ray, gpus=gpus)
    finally:
        study.close()


def _execute(source: Source, tracker: Tracker, n_jobs: int, verbose: bool, max_failures: float | None,
             outcome: SweepOutcome, redact: Redactor, echo: bool, summarise: Callable[[], None] | None = None,
             shared: Sequence[JobSpec] = (), jobs_dir: Path | None = None,
             best_model: BestModel | None = None, ray: RayConf | None = None,
             gpus: Sequence[str] = ()) -> SweepOutcome:
    """The engine's loop inside the parent run, then the results on the parent, also when
    interrupted (without plots, so that an interrupt ends fast). Workers: no more than
    the jobs to run; before they fork, the nodes all jobs share run once here (``shared``:
    specs that span the sweep)."""
    import os

    from . import engine, job_cache, results, terminal
    from .records import Status
    from .scheduler import make_scheduler

    n_jobs = max(1, min(n_jobs, source.planned))
    if n_jobs > (os.cpu_count() or 1) and ray is None:
        _note(outcome, f"{n_jobs} workers on {os.cpu_count()} CPUs: jobs will compete for them.", echo)
    if n_jobs > 1 and jobs_dir is not None:
        ran = job_cache.prewarm(shared, jobs_dir / "shared", outcome.parent_run_id or "")
        if ran:
            _note(outcome, f"Ran {', '.join(ran)} once for every job (node cache).", echo)
    if gpus and n_jobs > len(gpus):
        _note(outcome, f"{len(gpus)} jobs at a time: each asks for GPUs (ray.resources.gpus), and the GPUs here "
                       f"hold {len(gpus)}.", echo)
        n_jobs = len(gpus)
    scheduler = make_scheduler(n_jobs, verbose, ray, gpus, warm=shared[0] if shared else None)

    label = "study" if outcome.kind == "study" else "sweep"
    policy = engine.FailurePolicy(max_failures, source.planned)
    total = len(outcome.outcomes) if outcome.kind == "grid" else source.planned
    progress = terminal.SweepProgress(total, outcome.objective, label) if echo else None
    try:
        with engine.parent_run(tracker, outcome.parent_run_id or "") as parent:
            interrupted = True
            try:
                with scheduler, (progress or nullcontext()):  # workers fork before the progress thread starts
                    for done in outcome.outcomes:
                        if progress is not None and done.status is Status.SKIPPED:
                            progress.update(done)
                    engine.drive(source, scheduler, policy, _each(progress, best_model))
                interrupted = False
            except KeyboardInterrupt:
                if echo:
                    terminal.error(f"Interrupted: the {label} and its running jobs are KILLED. "
                                   f"To resume:\n  {outcome.command}")
                raise
            finally:
                if summarise is not None:
                    summarise()
                tracker.fail_stale_runs()  # runs of workers that died with their job
                results.log_parent(tracker, parent.run_id, outcome, redact)
                if best_model is not None:
                    best_model.finish(tracker, publish=not interrupted, note=lambda text: _note(outcome, text, echo))
            parent.status = "FINISHED" if outcome.exit_code == 0 else "FAILED"
            if echo:
                terminal.sweep_summary(outcome)
            try:  # last: an interrupt here loses only the plots
                results.log_plots(tracker, parent.run_id, outcome)
            except KeyboardInterrupt:
                if echo:
                    terminal.error(f"Interrupted while drawing the {label}'s plots; its results are recorded. "
                                   f"To draw them, resume:\n  {outcome.command}")
                raise
    except StoreUnavailable as err:  # its runs stay as the store last saw them: the next kmrun ends them
        raise StoreUnavailable(f"{err}\nThe {label} stopped. Once the store answers, resume:\n"
                               f"  {outcome.command}") from None
    return outcome


def _on_ray(first: JobSpec, base: Path, stores: dict[str, str], verbose: bool) -> RayConf | None:
    """With ``sweep.executor=ray``: join the cluster and check that its nodes reach the
    stores and get the project, before any run is made; the Ray settings, else None (local)."""
    conf = first.conf
    if conf.sweep.executor != "ray":
        return None
    from . import raycluster

    return raycluster.connect(conf.ray, {k: v for k, v in stores.items() if v}, conf.kedro.project_path,
                              first.redact, base, verbose)


def _warm_models(conf: KmrunConf, n_jobs: int) -> None:
    """Workers forked next inherit what saving a model imports (seconds each, otherwise)."""
    if n_jobs > 1 and conf.sweep.executor == "local":
        from . import models

        models.warm(conf)


def _gpu_slots(conf: KmrunConf) -> list[str]:
    """With the local executor and ``ray.resources.gpus``: the GPUs each job at a time sees.
    Too few GPUs for one job exits 2 before any run."""
    per_job = float(conf.ray.resources.get("gpus") or 0)
    if conf.sweep.executor == "ray" or per_job <= 0:
        return []
    from .scheduler import gpu_slots, visible_gpus

    devices = visible_gpus()
    slots = gpu_slots(devices, per_job)
    if not slots:
        raise ConfigError(f"ray.resources.gpus is {per_job:g}: each job asks for GPUs, but this machine shows "
                          f"{len(devices)} (CUDA_VISIBLE_DEVICES, nvidia-smi). Lower ray.resources.gpus, or drop it "
                          "to run on CPUs.")
    return slots


def _best_model(conf: KmrunConf, jobs_dir: Path, register: str | None) -> BestModel | None:
    """What keeps the best job's model (``model.runs: best``) and registers it."""
    from . import models

    if not models.wanted(conf) or (conf.model.runs != "best" and not register):
        return None
    direction = conf.objective.direction
    return models.BestModel(models.staging(jobs_dir), direction[0] if isinstance(direction, list) else direction,
                            register)


def _each(progress: SweepProgress | None, best_model: BestModel | None) -> Callable[[Outcome], None]:
    """What the engine calls with each finished job."""
    def each(outcome: Outcome) -> None:
        if progress is not None:
            progress.update(outcome)
        if best_model is not None:
            best_model.offer(outcome)
    return each


def sweep_dir(conf: KmrunConf, base: Path) -> Path:
    """Where a sweep's jobs write their datasets: ``sweep.dir``, else multirun/DATE/TIME
    (relative to ``base``, the folder holding conf/); made now, so that a folder that
    cannot be written fails before any job runs."""
    now = datetime.now()
    path = base / (Path(conf.sweep.dir) if conf.sweep.dir else Path("multirun", now.strftime("%Y-%m-%d"),
                                                                       now.strftime("%H-%M-%S-%f")))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"sweep.dir: cannot create {path}: {err.strerror}. Point it at a writable folder.") from None
    return path.resolve()


def resume_command(overrides: list[str], config_dir: str | Path | None, config_name: str) -> str:
    """The command that runs this sweep again (a forced rerun left out)."""
    flags = (["-cp", str(config_dir)] if config_dir else []) + (["-cn", config_name] if config_name != "kmrun" else [])
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "sweep.rerun"]
    return " ".join(["kmrun", "-m", *(shlex.quote(a) for a in flags + kept)])


def _shown(command: str, overrides: list[str], redact: Redactor) -> str:
    """The resume command as it may be shown and logged: secret values as ***."""
    shown = command
    for override in overrides:
        hidden = redact.override(override)
        if hidden != override:
            shown = shown.replace(shlex.quote(override), shlex.quote(hidden))
    if shown != command:
        shown += "   # secrets shown as ***: type them again"
    return shown


def _objective(conf: KmrunConf) -> Objective:
    from .records import Constraint, Objective

    metric, direction = conf.objective.metric, conf.objective.direction
    metrics = metric if isinstance(metric, list) else ([metric] if metric else [])
    directions = direction if isinstance(direction, list) else [direction] * max(1, len(metrics))
    return Objective([str(m) for m in metrics], [str(d) for d in directions],
                     [Constraint.parse(c) for c in conf.objective.constraints])


def _note(outcome: SweepOutcome, message: str, echo: bool) -> None:
    outcome.notes.append(message)
    if echo:
        from . import terminal

        terminal.say(message)


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


__all__ = ["JobFailed", "KmrunError", "run", "sweep"]
