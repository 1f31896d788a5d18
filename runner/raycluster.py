"""Where jobs run with ``sweep.executor=ray``: as tasks on a Ray cluster.

Only *where* a job runs changes: kmrun, the driver, keeps the engine (the grid's cells or
Optuna's ask and tell, the failure policy, the parent run, progress). ``RayWorkers`` is a
scheduler like ``scheduler.Workers``: ``submit(spec)`` returns a future of the job's
result, at most ``size`` jobs run at a time, each with ``ray.resources``.

- Every node runs the same Python environment with kmrun installed. The Kedro project is
  either at the same path on every node (a shared disk, or the same image), or shipped by
  Ray: ``ray.runtime_env.working_dir`` (a folder holding the project) is packed once by the
  driver, without ``conf/local`` and credentials files (``shipping``), and each task runs
  the project found at the same place inside it. A task ships the job's spec only, without
  secrets (``shipped``); each node reads the project's credentials itself.
- A task is not retried by Ray: a job whose node or worker died comes back as a lost
  worker, and kmrun runs it again once, as for a local worker.
- The stores must be reachable from every node: an SQLite file (or a journal file) is
  refused on a cluster of several nodes before any run starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, TrackingError, WorkerLost
from .redact import Redactor, hide_password

if TYPE_CHECKING:
    from .job import JobSpec
    from .records import JobResult
    from .schema import RayConf

log = logging.getLogger(__name__)

RESOURCES = {"cpus": "num_cpus", "gpus": "num_gpus", "memory": "memory"}  # ray.resources -> Ray's option
LOCAL_FILES = ("sqlite:", "file:", "journal:")
NODE = "KMRUN_RAY_NODE"  # set in a Ray worker: its node, which the runs it owns record
# never packed into a shipped working_dir: secrets, and what is this machine's or too big to travel
NOT_SHIPPED = ("**/credentials*", "**/conf/local/", ".git/", ".venv/", "venv/", "__pycache__/", "kmrun-cache/",
               ".kmrun-cache/", "mlruns/", "mlartifacts/", "**/sessions/")


def connect(settings: RayConf, stores: dict[str, str], project: str, redact: Redactor, base: Path,
            verbose: bool = False) -> RayConf:
    """Join the Ray cluster (``ray.address``, else ``$RAY_ADDRESS``, else a running local
    Ray, else one started now) with the job-wide ``ray.runtime_env`` (``shipping``), and
    check that every node can reach ``stores`` (setting -> URL). Returns the settings as
    the tasks use them. Raises ``ConfigError`` before any run."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sweep.executor=ray needs Ray, which is not installed. Install it: "
                          "pip install 'kmrun[ray]'") from None
    settings = shipping(settings, project, redact, base, stores)
    if not ray.is_initialized():
        address = settings.address or os.environ.get("RAY_ADDRESS")
        env = settings.runtime_env
        options: dict[str, Any] = {
            "log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR,
            "runtime_env": {**env, "env_vars": {**(env.get("env_vars") or {}), "KEDRO_DISABLE_TELEMETRY": "true"}}}
        try:
            if address:
                _reachable(address)
                ray.init(address=address, **options)
            else:
                try:
                    ray.init(address="auto", **options)
                except ConnectionError:  # no Ray runs here: one for this sweep
                    ray.init(**options)
        except Exception as err:
            raise ConfigError(f"ray.address: cannot join the Ray cluster at '{hide_password(address or 'auto')}': "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}. "
                              "Start it (ray start --head), or set ray.address (or RAY_ADDRESS) to its address, "
                              "e.g. ray.address=ray://HEAD:10001.") from None
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    local = {key: url for key, url in stores.items() if url.startswith(LOCAL_FILES) or url.endswith(".journal")}
    if nodes > 1 and local:
        key, url = next(iter(local.items()))
        ray.shutdown()
        raise TrackingError(
            f"{key} is a file on this machine ({hide_password(url)}), which the other {nodes - 1} nodes of the "
            "Ray cluster cannot reach. Use a store every node reaches: an MLflow server "
            "(mlflow.tracking_uri=http://HOST:5000) and a database (study.storage=postgresql://USER@HOST/DB).")
    return settings


def shipping(settings: RayConf, project: str, redact: Redactor, base: Path, stores: dict[str, str]) -> RayConf:
    """``ray.runtime_env`` as Ray gets it. Its ``env_vars`` hold no secret value (Ray shows
    them to whoever sees the cluster). A ``working_dir`` (relative to ``base``, the folder
    holding ``conf/``) must hold the Kedro project at ``project``; it is packed without
    ``NOT_SHIPPED`` and the local store files in it, on top of the user's ``excludes``."""
    env = dict(settings.runtime_env)
    for name, value in (env.get("env_vars") or {}).items():
        if redact.text(str(value)) != str(value):
            raise ConfigError(f"ray.runtime_env.env_vars.{name} holds a secret (a credential or a secret environment "
                              "variable's value), and Ray shows a runtime_env to whoever sees the cluster. Set it in "
                              "each node's environment instead.")
    if not env.get("working_dir"):
        return settings
    root = (base / Path(str(env["working_dir"])).expanduser()).resolve()
    if not root.is_dir():
        raise ConfigError(f"ray.runtime_env.working_dir: {root} is not a folder. Set it to the Kedro project's folder "
                          "(or one above it), which Ray then ships to every node.")
    if not Path(project).resolve().is_relative_to(root):
        raise ConfigError(f"ray.runtime_env.working_dir: {root} does not hold the Kedro project ({project}), so the "
                          "nodes would not get it. Set it to the project's folder or one above it.")
    files = [Path(url.split("///", 1)[-1]).resolve() for url in stores.values() if url.startswith(LOCAL_FILES)]
    local = [f"/{f.relative_to(root).as_posix()}" for f in files if f.is_relative_to(root)]
    env.update(working_dir=str(root), excludes=[*(env.get("excludes") or []), *NOT_SHIPPED, *local])
    return replace(settings, runtime_env=env)


def relocated(spec: JobSpec, root: str | None) -> JobSpec:
    """A spec whose project travels in the shipped ``root`` (``ray.runtime_env.working_dir``):
    its project path relative to it (a node resolves it in its copy, ``settled``), and the
    node cache where the driver's is (``cache.dir``), rather than in each copy."""
    if not root:
        return spec
    from .cache import default_dir

    conf = spec.conf
    inside = Path(conf.kedro.project_path).resolve().relative_to(root).as_posix()
    cache_dir = conf.cache.dir or str(default_dir(spec.uri))
    return replace(spec, conf=replace(conf, kedro=replace(conf.kedro, project_path=inside),
                                      cache=replace(conf.cache, dir=cache_dir)))


def settled(spec: JobSpec) -> JobSpec:
    """On a node: a project path relative to the shipped working_dir (the task's working
    directory) made whole, and the run tagged with the package it ran (``kmrun.ray_package``)."""
    import ray

    conf = spec.conf
    if Path(conf.kedro.project_path).is_absolute():
        return spec
    package = str(ray.get_runtime_context().runtime_env.get("working_dir") or "")
    project = str(Path.cwd() / conf.kedro.project_path)
    if Path(project, "conf").is_dir():  # conf/local stayed behind (NOT_SHIPPED); Kedro wants the folder
        Path(project, "conf", "local").mkdir(exist_ok=True)
    return replace(spec, conf=replace(conf, kedro=replace(conf.kedro, project_path=project)),
                   tags={**spec.tags, "kmrun.ray_package": package})


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer fails in seconds (Ray itself retries for minutes)."""
    import socket

    if address == "auto" or address.startswith("local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():
        return
    socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()


class RayWorkers:
    """Jobs as Ray tasks; ``size`` at a time (``connect`` comes first)."""

    def __init__(self, size: int, settings: RayConf, verbose: bool = False, warm: JobSpec | None = None) -> None:
        import ray

        self.size, self.verbose, self.warm = size, verbose, warm
        self.root = settings.runtime_env.get("working_dir")  # shipped by Ray: specs point into it
        options = {RESOURCES.get(k, k): v for k, v in settings.resources.items() if k in RESOURCES}
        custom = {k: float(v) for k, v in settings.resources.items() if k not in RESOURCES}
        self._task = ray.remote(_on_node).options(max_retries=0, retry_exceptions=False, resources=custom or None,
                                                  **options)
        self._warm_task = ray.remote(_warm_node).options(max_retries=0, resources=custom or None, **options)
        self._refs: dict[Future[JobResult], Any] = {}

    def submit(self, spec: JobSpec) -> Future[JobResult]:
        ref = self._task.remote(shipped(relocated(spec, self.root)))  # nothing secret in a task's arguments
        result: Future[JobResult] = Future()
        self._refs[result] = ref
        ref.future().add_done_callback(lambda done: _settle(result, done, self._refs))
        return result

    def __enter__(self) -> RayWorkers:
        """Each worker process bootstraps the Kedro project before the first job: a job's
        run (started when its cell is claimed) then times the job, not a worker's start."""
        import ray

        if self.warm is not None:
            try:
                warm = shipped(relocated(self.warm, self.root))
                ray.get([self._warm_task.remote(warm) for _ in range(self.size)], timeout=600)
            except Exception as err:  # the jobs bootstrap themselves, and report what fails
                log.debug("Warming the Ray workers failed: %s", err)
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        import ray

        if kind is not None and issubclass(kind, KeyboardInterrupt):
            # each running job gets KeyboardInterrupt in its task: it ends its run KILLED
            for ref in list(self._refs.values()):
                ray.cancel(ref)
            ray.wait(list(self._refs.values()), num_returns=len(self._refs), timeout=10)
        ray.shutdown()


def _on_node(spec: JobSpec) -> JobResult:
    """A job in a Ray worker process (imported there by name: every node has kmrun). The
    worker owns the job's run, which records its node (``kmrun.ray_node``)."""
    import ray

    from .job import execute

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.disable(logging.INFO)
    os.environ[NODE] = ray.get_runtime_context().get_node_id()[:12]
    return execute(arrived(settled(spec)))  # in the shipped project, if any; with this node's redactor


def shipped(spec: JobSpec) -> JobSpec:
    """The spec as it travels to another machine (a Ray task's arguments): its config and
    overrides already redacted, and no redactor (it holds every secret it hides). The
    machine that runs it builds its own (``arrived``) from the project's credentials and
    environment there. What the job itself needs goes as it is: its params overrides, and
    the store URLs (keep passwords out of them: MLflow's and PostgreSQL's own variables or
    files on each node)."""
    redact = spec.redact
    return replace(spec, conf=redacted_conf(spec.conf, redact), config=redact.tree(spec.config),
                   overrides=[redact.override(o) for o in spec.overrides], redact=Redactor())


def redacted_conf(conf: Any, redact: Redactor) -> Any:
    """A copy of kmrun's typed config (``KmrunConf``) with every string passed through
    ``redact`` and secret-named keys hidden (a job reads its params from ``JobSpec.params``)."""
    if dataclasses.is_dataclass(conf) and not isinstance(conf, type):
        return replace(conf, **{f.name: redacted_conf(getattr(conf, f.name), redact) for f in dataclasses.fields(conf)})
    return redact.tree(conf)


def arrived(spec: JobSpec) -> JobSpec:
    """A shipped spec, with the redactor of the machine that runs it."""
    from . import runtime
    from .job import redactor

    conf = spec.conf
    project = runtime.current().project(conf.kedro.project_path, conf.kedro.env)
    storage = [spec.trial.storage] if spec.trial is not None else []
    params = project.job_params(spec.params, conf.kedro.pipeline)
    return replace(spec, redact=redactor(project, params, spec.config, spec.uri, *storage))


def _warm_node(spec: JobSpec) -> None:
    """In a Ray worker, before its first job: kmrun's modules and the project loaded, and the
    store opened (about a second each, which the first job's run would otherwise hold)."""
    from . import runtime
    from .job import execute  # noqa: F401  (what a job imports)

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.disable(logging.INFO)
    conf = settled(spec).conf
    runtime.current().project(conf.kedro.project_path, conf.kedro.env).pipeline(conf.kedro.pipeline, conf.kedro.tags)
    runtime.current().tracker(spec.uri, spec.experiment_name)


def _settle(result: Future[JobResult], done: Future[Any], refs: dict[Future[JobResult], Any]) -> None:
    """The job's result, or why its task did not return one: the job's own exception, or a
    lost worker (its node died, its process was killed, it ran out of memory)."""
    import ray.exceptions as errors

    refs.pop(result, None)
    try:
        result.set_result(done.result())
    except errors.RayTaskError as err:  # the task raised: kmrun's own error, as it was raised
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
        result.set_exception(cause)
    except (errors.TaskCancelledError, KeyboardInterrupt):
        result.set_exception(KeyboardInterrupt())
    except errors.OutOfMemoryError as err:
        why = str(err).strip().split(". ")[0]
        result.set_exception(WorkerLost(f"The job ran out of memory: Ray's memory monitor killed it ({why}). Ask Ray "
                                        "for the memory a job needs, ray.resources.memory=BYTES (a job then starts "
                                        "only where that much is free), or run fewer jobs at a time."))
    except Exception as err:  # a node or worker died, an object was lost
        result.set_exception(WorkerLost(f"The Ray worker running this job died ({type(err).__name__}): "
                                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"))
