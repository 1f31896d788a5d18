"""One job: open a run → run the Kedro pipeline → read metrics → the objective.

``prepare`` turns a composed config into a ``JobSpec`` and checks everything that can
be checked before a run exists. ``execute`` is the seam where a job runs: it takes
plain data and returns plain data, so the same call runs in this process, in a
worker process, or (later) on another machine. It closes its MLflow run on every
path: FINISHED, FAILED, or KILLED on Ctrl-C.
"""

from __future__ import annotations

import getpass
import logging
import math
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .compose import added_on_purpose, check_params, config_hash, origin_finder
from .errors import KmrunError, MetricError
from .kedro_bridge import open_project
from .schema import KmrunConf, parse
from .tracking import Redactor, Tracker, flatten, git_tags, resolve_uri
from .trial import TrialRef, attach, report

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """Everything a worker needs to run one job. Plain data: it can cross processes."""

    conf: KmrunConf
    params: dict[str, Any]  # checked and coerced Kedro overrides
    overrides: list[str]  # Hydra overrides of this job, as typed
    config: dict[str, Any]  # the composed config, for the artifact
    config_hash: str
    uri: str
    experiment_name: str
    run_name: str | None = None
    parent_run_id: str | None = None
    output_dir: str | None = None  # where written datasets go; None: the project's own paths
    tags: dict[str, str] = field(default_factory=dict)
    trial: TrialRef | None = None  # the Optuna trial this job is, in a study


@dataclass
class JobResult:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED | PRUNED (an Optuna trial; its MLflow run is KILLED)
    metrics: dict[str, float]
    objective: float | list[float] | None
    error: str | None = None  # one paragraph for the user; the traceback is an artifact
    exit_code: int = 0  # 0; 1 for a pipeline error; 2 for bad input found while running
    written: dict[str, str] = field(default_factory=dict)


def prepare(
    cfg: DictConfig,
    overrides: list[str],
    choices: Mapping[str, Any] | None = None,
    conf_dir: Path | None = None,
    open_store: bool = True,
) -> JobSpec:
    """Check a composed config against the schema, the Kedro project and the store
    (unless ``open_store`` is false: a dry run creates nothing).

    Raises a ``KmrunError`` before any MLflow run exists when something is wrong.
    """
    from omegaconf import OmegaConf

    origin = origin_finder(conf_dir or Path.cwd() / "conf", overrides, choices or {})
    conf = parse(cfg, origin)
    project = open_project(conf.kedro.project_path, conf.kedro.env)
    params = check_params(conf.params, project.parameters(), added_on_purpose(overrides), origin)
    project.pipeline(conf.kedro.pipeline, conf.kedro.tags)
    uri = resolve_uri(conf.mlflow.tracking_uri)
    experiment = conf.mlflow.experiment_name or project.package_name
    if open_store:
        open_tracker(uri, experiment)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return JobSpec(
        conf=conf,
        params=params,
        overrides=list(overrides),
        config=config,
        config_hash=config_hash(config),
        uri=uri,
        experiment_name=experiment,
        run_name=conf.mlflow.run_name,
    )


def redactor(spec: JobSpec) -> Redactor:
    """What must never reach MLflow for this job: credentials, secret-named params, secret env vars."""
    project = open_project(spec.conf.kedro.project_path, spec.conf.kedro.env)
    return Redactor.for_project(project.credentials(), deep_merge(project.parameters(), spec.params))


@cache
def open_tracker(uri: str, experiment_name: str) -> Tracker:
    """One ``Tracker`` per store and experiment in this process."""
    return Tracker(uri, experiment_name)


def execute(spec: JobSpec) -> JobResult:
    """Run one job in its own MLflow run and return how it ended.

    Never raises for a failing pipeline: the run ends FAILED with its traceback as an
    artifact, and the result says why. Ctrl-C ends the run KILLED and propagates.
    """
    from omegaconf import OmegaConf

    conf = spec.conf
    project = open_project(conf.kedro.project_path, conf.kedro.env)
    tracker = open_tracker(spec.uri, spec.experiment_name)
    redact = redactor(spec)
    params = deep_merge(project.parameters(), spec.params)
    kedro_run_id = _kedro_run_id()
    tags = {
        **{k: str(v) for k, v in conf.mlflow.tags.items()},
        **spec.tags,
        **git_tags(project.root),
        "kmrun.version": __version__,
        "kmrun.overrides": " ".join(spec.overrides)[:5000],
        "kmrun.config_hash": spec.config_hash,
        "kedro.project": project.package_name,
        "kedro.pipeline": conf.kedro.pipeline,
        "kedro.env": project.env_name,
        "kedro.run_id": kedro_run_id,
        "mlflow.user": _user(),
        "mlflow.source.name": "kmrun",
    }
    if conf.kedro.tags:
        tags["kedro.tags"] = ",".join(conf.kedro.tags)
    run_id = tracker.start(spec.run_name, {k: redact.text(v) for k, v in tags.items()}, spec.parent_run_id)
    tracker.log(run_id, params=redact.params(flatten(params)))
    config_text = OmegaConf.to_yaml(OmegaConf.create(redact.tree(spec.config)))
    tracker.log_text(run_id, config_text, "config.yaml")
    tracker.log_text(run_id, redact.text("\n".join(spec.overrides) + "\n"), "overrides.txt")

    status, metrics, series, objective = "FAILED", {}, {}, None
    _current.update(tracker=tracker, run_id=run_id, trial=spec.trial)
    try:
        if spec.trial is not None:
            attach(spec.trial, run_id)
        kedro_run = project.run(
            spec.params,
            conf.kedro.pipeline,
            conf.kedro.tags,
            capture=set(conf.metrics),
            output_dir=Path(spec.output_dir) if spec.output_dir else None,
            run_id=kedro_run_id,
        )
        metrics, series = read_metrics(kedro_run.datasets, conf.metrics)
        objective = objective_of(conf, metrics, series, kedro_run.datasets, kedro_run.saved)
        status = "FINISHED"
        return JobResult(run_id, status, _latest(metrics, series), objective, written=kedro_run.written)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        if spec.trial is not None and type(err).__name__ == "TrialPruned":
            status = "KILLED"
            return JobResult(run_id, "PRUNED", _latest(metrics, series), None, str(err))
        tracker.log_text(run_id, redact.text(traceback.format_exc()), "traceback.txt")
        code = err.exit_code if isinstance(err, KmrunError) else 1
        return JobResult(run_id, status, _latest(metrics, series), objective, redact.text(_describe(err)), code)
    finally:
        _current.clear()
        try:
            tracker.log(run_id, metrics=metrics, series=series)
        finally:
            tracker.finish(run_id, status)


def read_metrics(
    datasets: Mapping[str, Any], names: list[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics from the captured datasets: a number is one metric named after its
    dataset, a dict gives one metric per numeric key, and a list (or a dict of lists)
    is a per-step series."""
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}

    def add(name: str, value: Any) -> None:
        if _number(value):
            scalars[name] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(_number(v) for v in value):
            series[name] = [float(v) for v in value]
        else:
            log.warning("Metric '%s' is not a number or a list of numbers; it is not logged.", name)

    for name in names:
        if name not in datasets:
            continue
        value = datasets[name]
        if isinstance(value, Mapping):
            for key, item in value.items():
                add(str(key), item)
        else:
            add(name, value)
    return scalars, series


def objective_of(
    conf: KmrunConf,
    metrics: Mapping[str, float],
    series: Mapping[str, list[float]],
    datasets: Mapping[str, Any],
    saved: list[str],
) -> float | list[float] | None:
    """The value(s) of ``objective.metric``; a ``MetricError`` when missing or not finite."""
    wanted = conf.objective.metric
    if wanted is None:
        return None
    values = []
    for name in wanted if isinstance(wanted, list) else [wanted]:
        value = metrics.get(name, series[name][-1] if name in series else None)
        raw = _raw_value(datasets, name)
        if value is None and raw is not None:
            raise MetricError(
                f"objective.metric '{name}' is {raw!r} ({type(raw).__name__}), not a number. "
                "Make the node return a number (or a list of numbers, one per step)."
            )
        if value is None:
            produced = ", ".join(sorted({*metrics, *series})) or "none"
            raise MetricError(
                f"objective.metric '{name}' was not produced by the pipeline.\n"
                f"Metrics read from the datasets in `metrics` ({', '.join(conf.metrics)}): {produced}.\n"
                f"Datasets the pipeline saved: {', '.join(dict.fromkeys(saved)) or 'none'}.\n"
                "Fix objective.metric, or add the dataset that holds it to `metrics`."
            )
        if not math.isfinite(value):
            raise MetricError(f"objective.metric '{name}' is {value}, not a finite number.")
        values.append(value)
    return values if isinstance(wanted, list) else values[0]


def _raw_value(datasets: Mapping[str, Any], name: str) -> Any:
    """What a metrics dataset held under ``name``, when it was not a number."""
    for key, value in datasets.items():
        if key == name:
            return value
        if isinstance(value, Mapping) and name in value:
            return value[name]
    return None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Kedro's runtime-params merge: nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        # dict, not Mapping: a first isinstance(x, Mapping) on a big process walks every
        # registered ABC and costs a quarter of a second; Kedro's params are plain dicts
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _latest(metrics: Mapping[str, float], series: Mapping[str, list[float]]) -> dict[str, float]:
    return {**{k: v[-1] for k, v in series.items()}, **metrics}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(err: BaseException) -> str:
    if isinstance(err, KmrunError):
        return str(err)
    node = getattr(err, "__notes__", None)
    where = f" ({'; '.join(node)})" if node else ""
    return f"The pipeline raised {type(err).__name__}: {err}{where}"


def _kedro_run_id() -> str:
    from kedro.io.core import generate_timestamp

    return generate_timestamp()


@cache
def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


_current: dict[str, Any] = {}  # the run ``report`` writes to: this process runs one job at a time


def report_step(value: float, step: int, name: str = "intermediate") -> None:
    """Log ``value`` at ``step`` on the current job's run and, in a study, report it to
    the trial, raising ``optuna.TrialPruned`` when the pruner stops it. Outside a kmrun
    job, nothing happens."""
    tracker, run_id, trial = _current.get("tracker"), _current.get("run_id"), _current.get("trial")
    if tracker is None or not _number(value):
        return
    tracker.log_step(run_id, name, float(value), int(step))
    if trial is not None:
        report(trial, float(value), int(step))
