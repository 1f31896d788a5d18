"""One job: open a run → run the Kedro pipeline → read metrics → the objective.

``prepare`` turns a composed config into a ``JobSpec`` and checks everything that can
be checked before a run exists. ``execute`` is the seam where a job runs: it takes
plain data and returns plain data, so the same call runs in this process, in a worker
process, or (later) on another machine. It closes its MLflow run on every path:
FINISHED, FAILED, KILLED on Ctrl-C (and KILLED for a pruned trial).
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, models, patience, runtime
from .compose import config_hash, origin_finder, resolved
from .errors import (
    ConfigError,
    JobFailed,
    KmrunBug,
    KmrunError,
    MetricError,
    ModelError,
    ObjectiveMissing,
    ParamError,
    TrackingError,
)
from .fluent import active_run, reporting_done, reporting_to
from .job_cache import cache_plan, cache_tags, kedro_run_id
from .kedro_bridge import KedroRun
from .metrics import is_point, latest, objective_of, read_metrics
from .params import added_on_purpose, check_params
from .records import Constraint, JobResult, Status
from .redact import Redactor, flatten
from .schema import KmrunConf, parse
from .tracking import name_rule, rejected_names, resolve_uri
from .trial import TrialRef, attach

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from .fingerprint import Fingerprint
    from .kedro_bridge import KedroProject
    from .tracking import Tracker

log = logging.getLogger(__name__)

NOT_GROUPS = ("experiment", "study", "sweep")  # kmrun's own groups: what a job is, not how it is configured


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
    redact: Redactor  # what must never reach MLflow for this job
    run_name: str | None = None
    parent_run_id: str | None = None
    output_dir: str | None = None  # where written datasets go; None: the project's own paths
    tags: dict[str, str] = field(default_factory=dict)
    trial: TrialRef | None = None  # the Optuna trial this job is, in a study
    run_id: str | None = None  # a run already started for this job (a claimed grid cell)
    fingerprint: Fingerprint | None = None  # the code, Kedro config and input files it depends on
    fluent: bool = True  # make the run MLflow's active run while the pipeline runs (the project logs itself)
    groups: dict[str, str] = field(default_factory=dict)  # the config groups' options it was composed with


def prepare(
    cfg: DictConfig,
    overrides: list[str],
    choices: Mapping[str, Any] | None = None,
    conf_dir: Path | None = None,
    open_store: bool = True,
    base_dir: Path | None = None,
) -> JobSpec:
    """Check a composed config against the schema, the Kedro project and the store
    (unless ``open_store`` is false: a dry run creates nothing).

    Raises a ``KmrunError`` before any MLflow run exists when something is wrong.
    Relative paths (``kedro.project_path``, ``cache.dir``, the default store) start at ``base_dir``: the
    folder holding ``conf/`` (the working directory by default).
    """
    origin = origin_finder(conf_dir or Path.cwd() / "conf", overrides, choices or {})
    conf = parse(cfg, origin)
    return checked(conf, resolved(cfg), overrides, choices, origin, open_store, base_dir)


def checked(conf: KmrunConf, config: dict[str, Any], overrides: list[str], choices: Mapping[str, Any] | None,
            origin: Callable[[str], str], open_store: bool = True, base_dir: Path | None = None) -> JobSpec:
    """``prepare`` once the config is typed (``conf``) and plain (``config``): the checks
    against the Kedro project and the store, and the job's spec."""
    rt = runtime.current()
    base = base_dir or Path.cwd()
    # as `kmrun cache` finds it, from whichever folder kmrun was started in
    cache_dir = str(base / Path(conf.cache.dir).expanduser()) if conf.cache.dir else None
    conf = replace(conf, kedro=replace(conf.kedro, project_path=str(base / Path(conf.kedro.project_path).expanduser())),
                   cache=replace(conf.cache, dir=cache_dir))
    project = rt.project(conf.kedro.project_path, conf.kedro.env)
    params = check_params(conf.params, project.parameters(), added_on_purpose(overrides), origin)
    project.pipeline(conf.kedro.pipeline, conf.kedro.tags)
    project.job_params(params, conf.kedro.pipeline, typed=True)  # Kedro's typed parameters check the values
    models.check(conf, project)
    for name in conf.artifacts:
        if project.filepath(name, params) is None:
            files = project.catalog(params).files()
            raise ConfigError(f"artifacts: '{name}' is not a dataset with a file in the catalog of {project.root}. "
                              f"Datasets with files: {', '.join(files) or 'none'}.")
    bad = rejected_names(flatten(project.job_params(params, conf.kedro.pipeline)))
    if bad:
        raise ParamError(
            f"MLflow cannot store a parameter named {', '.join(repr(n) for n in bad)}{origin('params.' + bad[0])}. "
            f"{name_rule()} Rename it in the project's parameters (or the override)."
        )
    uri = resolve_uri(conf.mlflow.tracking_uri, base)
    experiment = conf.mlflow.experiment_name or project.package_name
    if open_store:
        rt.tracker(uri, experiment)
    redact = redactor(project, project.job_params(params, conf.kedro.pipeline), config, uri)
    return JobSpec(
        conf=conf,
        params=params,
        overrides=list(overrides),
        config=config,
        config_hash=config_hash(config),
        uri=uri,
        experiment_name=experiment,
        redact=redact,
        run_name=redact.text(conf.mlflow.run_name) if conf.mlflow.run_name else None,
        fingerprint=rt.fingerprint(project, conf.kedro.pipeline, conf.kedro.tags, params),
        fluent=rt.uses_mlflow(project),
        groups={str(k): str(v) for k, v in (choices or {}).items() if v is not None and str(k) not in NOT_GROUPS
                and not str(k).startswith("hydra")},
    )


def recorded_params(spec: JobSpec) -> dict[str, Any]:
    """The params a job's run records: every parameter as Kedro resolves it for the job
    (runtime params applied; typed sections as the values they are written as), flattened,
    with secrets redacted."""
    conf = spec.conf
    project = runtime.current().project(conf.kedro.project_path, conf.kedro.env)
    return spec.redact.params(flatten(project.job_params(spec.params, conf.kedro.pipeline)))


def redactor(project: KedroProject, params: Mapping[str, Any], config: Mapping[str, Any], *uris: str) -> Redactor:
    """What must never reach MLflow for a job: the project's credentials, secret-named
    params (``params``: the job's, as Kedro resolves them) and environment variables, and
    the password of every URL in the config (tracking URI, study and sweep storages, any
    later key) and of ``uris``."""
    urls = [*uris, *(str(v) for v in flatten(config).values() if isinstance(v, str) and "://" in v)]
    return Redactor.for_project(project.credentials(), params, urls=urls)


def execute(spec: JobSpec) -> JobResult:
    """Run one job in its own MLflow run and return how it ended.

    Never raises for a failing job: the run ends FAILED with its traceback as an
    artifact, and the result carries the error (``JobFailed`` for the pipeline,
    ``MetricError`` for the objective, ``KmrunBug`` for kmrun itself). Ctrl-C ends the
    run KILLED and propagates.
    """
    rt = runtime.current()
    conf = spec.conf
    patience.configure(conf.store_patience)
    project = rt.project(conf.kedro.project_path, conf.kedro.env)
    tracker = rt.tracker(spec.uri, spec.experiment_name)
    record = KedroRun(kedro_run_id(), capture=set(conf.metrics) | models.captured(conf, project),
                      output_dir=Path(spec.output_dir) if spec.output_dir else None)
    record.cache, record.plan = cache_plan(spec, project)  # cache=false: computes all, refreshes the entries
    tags = {
        **{k: str(v) for k, v in conf.mlflow.tags.items()},
        **spec.tags,
        **rt.git_tags(project.root),
        "kmrun.version": __version__,
        "kmrun.overrides": " ".join(spec.redact.override(o) for o in spec.overrides)[:5000],
        "kmrun.config_hash": spec.config_hash,
        "kedro.project": project.package_name,
        "kedro.pipeline": conf.kedro.pipeline,
        "kedro.env": project.env_name,
        "kedro.run_id": record.run_id,
        "mlflow.user": _user(),
        "mlflow.source.name": "kmrun",
    }
    if conf.kedro.tags:
        tags["kedro.tags"] = ",".join(conf.kedro.tags)
    if conf.objective.constraints:  # what a best run must meet (kmrun best leaves out runs that do not)
        tags["kmrun.constraints"] = "; ".join(conf.objective.constraints)
    if conf.objective.metric:  # what this run was optimised for (kmrun best says when it ranks others)
        wanted = conf.objective.metric
        tags["kmrun.objective"] = ",".join(wanted) if isinstance(wanted, list) else str(wanted)
        direction = conf.objective.direction
        tags["kmrun.direction"] = ",".join(direction) if isinstance(direction, list) else str(direction)
    if spec.fingerprint is not None:
        tags.update(spec.fingerprint.tags())
    if spec.output_dir:
        tags["kmrun.output_dir"] = spec.output_dir  # where this job's datasets are written
    if spec.groups:  # which option of each config group (a study's family): promote writes them back
        tags["kmrun.groups"] = ",".join(f"{group}={option}" for group, option in sorted(spec.groups.items()))
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # the GPUs this job was given (ray.resources.gpus, or Ray's)
        tags["kmrun.gpus"] = os.environ["CUDA_VISIBLE_DEVICES"]
    shown = {k: spec.redact.text(v) for k, v in tags.items()}
    late: dict[str, str] = {}
    if spec.run_id is not None:  # claimed (started) by the sweep: its tags go with the final batch
        run_id, late = spec.run_id, shown
        tracker.adopt(run_id)
    else:
        run_id = tracker.start(spec.run_name, shown, spec.parent_run_id)
    record.mlflow_run_id = run_id
    job = _Job(spec, project, tracker, run_id, record)
    job.late_tags = late
    try:
        with spec.redact.logs():  # Kedro logs a node's error message, which may quote a secret
            job.work()
    except KeyboardInterrupt:
        job.status = Status.KILLED
        job.close()
        raise
    return job.close()


class _Job:
    """One job's run, from its first artifact to its final status."""

    def __init__(self, spec: JobSpec, project: KedroProject, tracker: Tracker, run_id: str, record: KedroRun) -> None:
        self.spec, self.project, self.tracker, self.run_id, self.record = spec, project, tracker, run_id, record
        self.status = Status.FAILED
        self.metrics: dict[str, float] = {}
        self.series: dict[str, list[float]] = {}
        self.objective: float | list[float] | None = None
        self.error: KmrunError | None = None
        self.late_tags: dict[str, str] = {}  # tags of a claimed run, sent with the final batch

    def work(self) -> None:
        """Run the job; catch every failure except Ctrl-C, recording its traceback."""
        from omegaconf import OmegaConf

        spec, redact = self.spec, self.spec.redact
        reporting_to(self.tracker, self.run_id, spec.trial)
        try:
            self.tracker.log_texts(self.run_id, {
                "config.yaml": OmegaConf.to_yaml(OmegaConf.create(redact.tree(spec.config))),
                "overrides.txt": "".join(redact.override(o) + "\n" for o in spec.overrides)})
            if spec.trial is not None:
                attach(spec.trial, self.run_id)
            self._pipeline()
            self.metrics, self.series = read_metrics(self.record.datasets, spec.conf.metrics)
            bad = rejected_names([*self.metrics, *self.series])
            if bad:
                for name in bad:
                    self.metrics.pop(name, None)
                    self.series.pop(name, None)
                raise MetricError(
                    f"The pipeline's metrics include {', '.join(repr(n) for n in bad)}, which MLflow cannot "
                    f"store. {name_rule()} Rename them in the node that returns them."
                )
            self.objective = objective_of(spec.conf, self.metrics, self.series, self.record.datasets, self.record.saved)
            for rule in map(Constraint.parse, spec.conf.objective.constraints):
                if rule.metric not in self.metrics and rule.metric not in self.series:
                    raise ObjectiveMissing(
                        f"objective.constraints: '{rule}' names the metric '{rule.metric}', which the pipeline did not "
                        f"produce (its metrics: {', '.join(sorted(self.metrics)) or 'none'}). Fix the name, or "
                        "return the metric from a node into a metrics dataset.")
            self._model()
            self._artifacts()
            self.status = Status.FINISHED
        except _Pruned as pruned:
            self.status, self.error = Status.PRUNED, None
            log.debug("%s", pruned)
        except KmrunError as err:
            self._failed(err)
        except Exception as err:
            self._failed(KmrunBug(f"kmrun bug while running the job: {type(err).__name__}: {err}"))
        finally:
            reporting_done()

    def _pipeline(self) -> None:
        spec = self.spec
        try:
            with active_run(spec.uri, self.run_id) if spec.fluent else nullcontext():
                self.project.run(self.record, spec.params, spec.conf.kedro.pipeline, spec.conf.kedro.tags)
        except Exception as err:
            if spec.trial is not None and _is_pruned(err):
                raise _Pruned(str(err)) from err
            if isinstance(err, KmrunError):
                raise
            raise JobFailed(_describe(err)) from err

    def _model(self) -> None:
        """Save the trained model: uploaded now, or kept for the sweep's end (``model.runs: best``)."""
        spec = self.spec
        if not models.wanted(spec.conf):
            return
        params = self.record.params if self.record.params is not None else self.project.job_params(
            spec.params, spec.conf.kedro.pipeline)
        later = spec.conf.model.runs == "best" and spec.parent_run_id and spec.output_dir
        folder = models.staging(Path(spec.output_dir or "").parent) / self.run_id if later else \
            Path(tempfile.mkdtemp(prefix="kmrun-model-"))
        try:
            flavor = models.save(spec.conf, self.project, params, self.record.datasets, spec.redact,
                                 folder / models.MODEL_PATH)
            if later:
                (folder / "flavor").write_text(flavor)
            else:
                models.publish_model(self.tracker, self.run_id, folder / models.MODEL_PATH, flavor)
        except KmrunError:
            raise
        except Exception as err:
            raise ModelError(f"Could not save the model ({spec.conf.model.dataset or spec.conf.model.pipeline})"
                                    f": {type(err).__name__}: {err}") from err
        finally:
            if not later:
                shutil.rmtree(folder, ignore_errors=True)

    def _artifacts(self) -> None:
        """The files of the datasets listed in ``artifacts``, under the run's ``outputs/``."""
        cached = {k: v for entry in (self.record.plan.hits.values() if self.record.plan else [])
                  for k, v in entry.outputs.items()}
        for name in self.spec.conf.artifacts:
            path: str | Path | None = self.record.written.get(name) or self.project.filepath(name, self.spec.params)
            if name not in self.record.written and name in cached:  # not written by this job: its cached value is
                scratch = Path(tempfile.mkdtemp(prefix="kmrun-artifact-"))
                try:
                    path = self.project.save_copy(name, cached[name], scratch, self.spec.params)
                    self._log_artifact(name, path)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                continue
            if path is None or not Path(path).exists():
                log.warning("artifacts: dataset '%s' wrote no file in this run; nothing to log.", name)
                continue
            self._log_artifact(name, path)

    def _log_artifact(self, name: str, path: str | Path) -> None:
        if Path(path).is_dir():
            self.tracker.client.log_artifacts(self.run_id, str(path), f"outputs/{name}")
        else:
            self.tracker.client.log_artifact(self.run_id, str(path), "outputs")

    def _logged_by_project(self) -> set[str]:
        """Metrics a kedro-mlflow metric dataset already logged into this run when its node
        saved it (kmrun logging them again would give each a second point)."""
        names: set[str] = set()
        catalog = self.project.catalog(self.spec.params)
        for name in self.spec.conf.metrics:
            kind = str((catalog.entry(name) or {}).get("type", ""))
            if name not in self.record.saved or "kedro_mlflow" not in kind or "Metric" not in kind:
                continue
            value = self.record.datasets.get(name)
            if isinstance(value, dict) and not is_point(value):
                names.update(str(key) for key in value)
            else:
                names.add(name)
        return names

    def _failed(self, err: KmrunError) -> None:
        self.status = Status.FAILED
        self.error = type(err)(self.spec.redact.text(str(err)))
        try:
            self.tracker.log_text(self.run_id, self.spec.redact.text(traceback.format_exc()), "traceback.txt")
        except Exception as log_error:  # the run still ends FAILED, with the reason in the result
            log.warning("Could not store traceback.txt for run %s: %s", self.run_id, log_error)

    def close(self) -> JobResult:
        """Log the resolved params and the metrics, then end the run. A run whose records
        could not be written ends FAILED, never FINISHED without its metrics."""
        spec = self.spec
        logged = self._logged_by_project()
        try:
            self.tracker.log(self.run_id, params=recorded_params(spec),
                             metrics={k: v for k, v in self.metrics.items() if k not in logged},
                             series={k: v for k, v in self.series.items() if k not in logged},
                             tags={**self.late_tags, **cache_tags(self.record)})
        except Exception as err:
            if self.status is Status.FINISHED:
                self.status = Status.FAILED
                self.error = TrackingError(f"The job ran, but its params and metrics could not be stored: {err}")
            log.warning("Could not store the params and metrics of run %s: %s", self.run_id, err)
        self.tracker.finish(self.run_id, self.status.run_status)
        plan = self.record.plan
        return JobResult(self.run_id, self.status, latest(self.metrics, self.series), self.objective,
                         self.error, dict(self.record.written), plan.sources if plan else {})


class _Pruned(Exception):
    """The pipeline stopped because the trial's pruner said so."""


def _is_pruned(err: BaseException) -> bool:
    import optuna

    return isinstance(err, optuna.TrialPruned)


def _describe(err: BaseException) -> str:
    node = getattr(err, "__notes__", None)
    where = f" ({'; '.join(node)})" if node else ""
    return f"The pipeline raised {type(err).__name__}: {err}{where}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers)
        return "unknown"
