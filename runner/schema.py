"""kmrun's own config, as typed dataclasses.

Every section a user may write in ``conf/`` is declared here, with its default.
``params`` is free-form (it mirrors the Kedro project's parameters) and is checked
against Kedro by ``compose``; everything else must match these classes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from functools import cache
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError
from .redact import is_secret_name

# OmegaConf reads these annotations at runtime, so they use typing's generics.


@dataclass
class KedroConf:
    project_path: str = "."  # Kedro project root; relative to the working directory
    env: Optional[str] = None  # Kedro config env; None: the project's default run env
    pipeline: str = "__default__"  # registered pipeline to run
    tags: List[str] = field(default_factory=list)  # run only nodes with any of these tags


@dataclass
class MlflowConf:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: Optional[str] = None  # None: the Kedro package name
    run_name: Optional[str] = None  # None: MLflow picks one
    tags: Dict[str, str] = field(default_factory=dict)  # extra tags on every run


@dataclass
class ObjectiveConf:
    metric: Any = None  # metric name (or a list, for a multi-objective study); None: no objective
    direction: Any = "maximize"  # minimize | maximize (or a list, as long as metric)
    constraints: List[str] = field(default_factory=list)  # "METRIC <= NUMBER" or ">= NUMBER": the best meets them


@dataclass
class SweepConf:
    params: Dict[str, Any] = field(default_factory=dict)  # grid from YAML: key -> sweep expression
    n_jobs: int = 1  # jobs at a time, each in its own worker process when > 1
    max_failures: Optional[float] = None  # stop launching after this many failures (<1: a fraction); None: no limit
    rerun: bool = False  # run every cell again, even those already FINISHED
    dry_run: bool = False  # print the jobs and exit; nothing runs, no MLflow run is created
    dir: Optional[str] = None  # where each job writes its datasets; None: multirun/DATE/TIME/<job>
    register_best: Optional[str] = None  # register the best cell's model under this name when the grid ends
    storage: Optional[str] = None  # Optuna storage URL sharing the cells among processes/machines; None: MLflow store
    executor: str = "local"  # where a sweep's jobs run: local (this machine's processes) or ray (a Ray cluster)


@dataclass
class RayConf:
    address: Optional[str] = None  # None: $RAY_ADDRESS, else a running local Ray, else one started for the sweep
    resources: Dict[str, Any] = field(default_factory=lambda: {"cpus": 1})  # each job's: cpus, gpus, memory, custom
    runtime_env: Dict[str, Any] = field(default_factory=dict)  # Ray's: working_dir ships the project, py_modules, pip


@dataclass
class StudyConf:
    n_trials: int = 20  # COMPLETE + PRUNED trials the study should hold in total
    more: Optional[int] = None  # instead: run this many more finished trials than it holds now
    timeout: Optional[float] = None  # seconds; no new trial starts after it
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})  # name + its options
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})  # name + its options
    storage: Optional[str] = None  # None: sqlite optuna.db beside the MLflow store; a URL; *.journal
    name: Optional[str] = None  # None: the study file's name
    n_jobs: int = 1  # trials at a time, each in its own worker process when > 1
    max_failures: Optional[float] = None  # stop after this many failed trials (<1: a fraction); None: n_trials
    search_space: Dict[str, Any] = field(default_factory=dict)  # key -> interval/int/range/choice/tag(log)
    export_best: Optional[str] = None  # also write the best params to conf/experiment/<this>.yaml
    register_best: Optional[str] = None  # register the best trial's model under this name when the study ends
    warm_start: bool = False  # add FINISHED runs of the experiment on the current code, inside the space, as trials
    enqueue: List[Any] = field(default_factory=list)  # param sets ({key: value}) or experiment names to run first


@dataclass
class CacheConf:
    enabled: bool = True  # reuse node outputs whose inputs, params and code are unchanged (`cache: false`: off)
    dir: Optional[str] = None  # None: kmrun-cache/ beside an SQLite MLflow store, else ./.kmrun-cache
    max_gb: float = 2.0  # least recently used entries go beyond this size
    secrets: bool = False  # also cache nodes that read a secret-named parameter (their outputs may hold it)


@dataclass
class ModelConf:
    dataset: Optional[str] = None  # the Kedro dataset holding the trained model; None: no model is logged
    flavor: str = "auto"  # auto: from the model's library (scikit-learn, xgboost, ...), else pyfunc; or a flavor name
    input_example: Optional[str] = None  # a Kedro dataset whose first rows are the input example (and signature)
    example_rows: int = 5  # rows of it kept as the input example
    pipeline: Optional[str] = None  # instead of a dataset: a Kedro pipeline packaged with the trained data as a model
    pipeline_input: Optional[str] = None  # that pipeline's raw input dataset (what a caller sends)
    runs: str = "best"  # in a sweep or study, which runs get a model: best, all or none


@dataclass
class KmrunConf:
    kedro: KedroConf = field(default_factory=KedroConf)
    params: Dict[str, Any] = field(default_factory=dict)  # Kedro parameter overrides, nested
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    objective: ObjectiveConf = field(default_factory=ObjectiveConf)
    metrics: List[str] = field(default_factory=lambda: ["metrics"])  # datasets that hold metrics
    verbose: bool = False  # show Kedro's node-by-node log lines (same as -v)
    store_patience: float = 120.0  # seconds kmrun waits for a store (MLflow, Optuna) that stopped answering
    sweep: SweepConf = field(default_factory=SweepConf)
    study: Optional[StudyConf] = None  # an Optuna study (+study=NAME), see docs/config.md
    cache: CacheConf = field(default_factory=CacheConf)  # the node cache
    model: ModelConf = field(default_factory=ModelConf)  # log the trained model as an MLflow Model
    artifacts: List[str] = field(default_factory=list)  # Kedro datasets whose files are logged with each run
    ray: RayConf = field(default_factory=RayConf)  # with sweep.executor=ray: the cluster and each job's resources


SECTIONS = ("kedro", "params", "mlflow", "objective", "metrics", "verbose", "store_patience", "sweep", "study",
            "cache", "model", "artifacts", "ray")
MODEL_RUNS = ("best", "all", "none")
EXECUTORS = ("local", "ray")
DIRECTIONS = ("minimize", "maximize")


def parse(cfg: DictConfig, origin: Callable[[str], str] = lambda key: "") -> KmrunConf:
    """Check the composed config against the schema and return it typed.

    ``hydra`` is Hydra's own section and is left out. Raises ``ConfigError`` naming the
    first unknown key or bad value and what would be accepted.
    """
    plain = {str(k): v for k, v in cfg.items() if k != "hydra"}
    for key in plain:
        if key not in SECTIONS:
            raise ConfigError(_unknown(str(key), SECTIONS, where="", source=origin(str(key)).strip()))
    params = plain.pop("params", None) or {}
    # The jobs of a sweep mostly differ in params only: the rest is checked once (unless
    # it interpolates, since what it resolves to may change).
    seen = json.dumps(OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(plain)), resolve=False),
                      sort_keys=True, default=repr)
    if "${" in seen:
        conf = _parse(plain, origin)
    else:
        if seen not in _PARSED:
            if len(_PARSED) > 256:
                _PARSED.clear()
            _PARSED[seen] = _parse(plain, origin)
        conf = copy.deepcopy(_PARSED[seen])
    conf.params = OmegaConf.to_container(params, resolve=True) if params else {}  # type: ignore[assignment]
    return conf


_PARSED: dict[str, KmrunConf] = {}  # the non-params part of a config, checked, by its content


def _parse(plain: dict[str, Any], origin: Callable[[str], str]) -> KmrunConf:
    if isinstance(plain.get("cache"), bool):  # `cache: false` is short for `cache: {enabled: false}`
        plain["cache"] = {"enabled": plain["cache"]}
    try:
        merged = OmegaConf.merge(_schema(), plain)
    except ConfigKeyError as err:
        raise ConfigError(unknown_key(str(err.full_key), origin(str(err.full_key)).strip())) from None
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"Config key '{err.full_key}'{origin(str(err.full_key))} has a value of the wrong type: "
            f"{str(err.msg).splitlines()[0]}"
        ) from None
    conf: KmrunConf = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check_objective(conf.objective)
    _check_bounds(conf)
    _check_model(conf)
    return conf


def _check_model(conf: KmrunConf) -> None:
    model = conf.model
    if model.runs not in MODEL_RUNS:
        raise ConfigError(f"model.runs is {model.runs!r}; use one of: {', '.join(MODEL_RUNS)}.")
    if model.dataset and model.pipeline:
        raise ConfigError("model.dataset and model.pipeline are both set; give one: the dataset holding the "
                          "trained model, or the inference pipeline to package with it.")
    if model.pipeline and not model.pipeline_input:
        raise ConfigError(f"model.pipeline is '{model.pipeline}' but model.pipeline_input is not set; name the "
                          "dataset the pipeline takes as its raw input (what a caller of the model sends).")
    if model.example_rows < 1:
        raise ConfigError(f"model.example_rows is {model.example_rows}; use 1 or more.")
    registering = (conf.sweep.register_best, conf.study.register_best if conf.study else None)
    for key, name in zip(("sweep.register_best", "study.register_best"), registering, strict=True):
        if name and not (model.dataset or model.pipeline):
            raise ConfigError(f"{key} is '{name}' but no model is logged: set model.dataset (or model.pipeline).")
        if name and model.runs == "none":
            raise ConfigError(f"{key} is '{name}' but model.runs is none; use best or all.")


def _check_bounds(conf: KmrunConf) -> None:
    """Numbers that would run nothing, or run away, fail before anything starts."""
    problems = []
    sweep, study = conf.sweep, conf.study
    if sweep.n_jobs < 1:
        problems.append(f"sweep.n_jobs is {sweep.n_jobs}; use 1 or more (jobs at a time).")
    if sweep.executor not in EXECUTORS:
        problems.append(f"sweep.executor is '{sweep.executor}'; use {' or '.join(EXECUTORS)}.")
    for name, amount in conf.ray.resources.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < math.inf:
            problems.append(f"ray.resources.{name} is {amount!r}; use a number ≥ 0 (cpus, gpus, memory in bytes, "
                            "or a custom resource of your cluster).")
    env_vars, working_dir = conf.ray.runtime_env.get("env_vars") or {}, conf.ray.runtime_env.get("working_dir", "")
    if not isinstance(env_vars, Mapping) or not isinstance(working_dir, str):
        problems.append("ray.runtime_env: env_vars is a mapping (NAME: value) and working_dir a path.")
    elif secret := [k for k in env_vars if is_secret_name(str(k))]:
        problems.append(f"ray.runtime_env.env_vars.{secret[0]} looks secret, and Ray shows a runtime_env to anyone "
                        "who can see the cluster (its dashboard, its logs). Set it in each node's environment instead.")
    if not 0 <= conf.store_patience <= 86400:
        problems.append(f"store_patience is {conf.store_patience}; use seconds from 0 (do not wait) to 86400.")
    if sweep.max_failures is not None and sweep.max_failures <= 0:
        problems.append(f"sweep.max_failures is {sweep.max_failures}; use a count ≥ 1, a share in (0, 1), or null.")
    if study is not None:
        if study.n_trials < 1:
            problems.append(f"study.n_trials is {study.n_trials}; use 1 or more.")
        if study.more is not None and study.more < 1:
            problems.append(f"study.more is {study.more}; use 1 or more (or null to aim at n_trials).")
        if study.n_jobs < 1:
            problems.append(f"study.n_jobs is {study.n_jobs}; use 1 or more (trials at a time).")
        if study.timeout is not None and study.timeout <= 0:
            problems.append(f"study.timeout is {study.timeout}; use a number of seconds > 0, or null.")
        if study.max_failures is not None and study.max_failures <= 0:
            problems.append(f"study.max_failures is {study.max_failures}; use a count ≥ 1, a share in (0, 1), or null.")
        if study.export_best is not None:
            check_experiment_name(study.export_best, "study.export_best")
    if problems:
        raise ConfigError("\n".join(problems))


@cache
def _structured() -> DictConfig:
    return OmegaConf.structured(KmrunConf)


def _schema() -> DictConfig:
    """A fresh copy of the schema as an OmegaConf node (building it is the slow part)."""
    return _structured().copy()


def _check_objective(objective: ObjectiveConf) -> None:
    metrics = objective.metric if isinstance(objective.metric, list) else [objective.metric]
    directions = (
        objective.direction if isinstance(objective.direction, list) else [objective.direction]
    )
    for direction in directions:
        if direction not in DIRECTIONS:
            raise ConfigError(
                f"objective.direction is {direction!r}; use one of: {', '.join(DIRECTIONS)}."
            )
    from .records import Constraint

    for index, text in enumerate(objective.constraints):
        try:
            Constraint.parse(text)
        except ValueError:
            raise ConfigError(f"objective.constraints[{index}] is {text!r}; write METRIC <= NUMBER or "
                              "METRIC >= NUMBER, e.g. 'f1_macro >= 0.9'.") from None
    if objective.metric is not None and len(metrics) != len(directions):
        if len(directions) == 1:
            objective.direction = directions * len(metrics)
        else:
            raise ConfigError(
                f"objective.metric names {len(metrics)} metric(s) but objective.direction "
                f"gives {len(directions)} direction(s). Give one direction per metric."
            )


EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_experiment_name(name: str, where: str) -> None:
    """A name for conf/experiment/NAME.yaml: one plain file name, nothing that climbs out."""
    if not EXPERIMENT_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{where} {name!r}: use a plain name (letters, digits, _ . -, no slash), such as tuned_lr; "
            "it becomes conf/experiment/NAME.yaml."
        )


def unknown_key(key: str, source: str = "") -> str:
    """The message for an unknown dotted key of kmrun's config."""
    section = key.rpartition(".")[0]
    try:
        allowed = _fields_of(section)
    except KeyError:
        allowed = list(SECTIONS)
    return _unknown(key, allowed, where=section, source=source)


def _fields_of(section: str) -> list[str]:
    classes = {"": KmrunConf, "kedro": KedroConf, "mlflow": MlflowConf, "objective": ObjectiveConf,
               "sweep": SweepConf, "study": StudyConf, "cache": CacheConf, "model": ModelConf, "ray": RayConf}
    return [f.name for f in dataclasses.fields(classes[section])]


def _unknown(key: str, allowed: Any, where: str, source: str = "") -> str:
    name = key.rpartition(".")[2]
    close = get_close_matches(name, list(allowed), n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    place = f"'{where}'" if where else "kmrun's config"
    return (
        f"Unknown key '{key}' in {place}{' ' + source if source else ''}.{hint}\n"
        f"Accepted keys: {', '.join(allowed)}. They are documented in docs/config.md."
    )
