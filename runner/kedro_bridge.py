"""Kedro: bootstrap a project once per process, then run it once per job.

A job gets a fresh run on one long-lived ``KedroServiceSession`` with the job's
parameters as runtime params. kmrun's hook (added through Kedro's ``HOOKS`` setting)
records the parameters Kedro resolved, captures the datasets kmrun reads metrics from,
and moves every file the pipeline writes into the job's own directory, so that
parallel jobs never overwrite each other. Inputs the pipeline only reads stay shared.
"""

from __future__ import annotations

import json
import logging
import sys
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedro.framework.hooks import hook_impl

from .errors import ParamError, ProjectError
from .kedro_config import ParsedConfig

if TYPE_CHECKING:
    from kedro.framework.session import KedroServiceSession
    from kedro.pipeline import Pipeline

    from .cache import NodeCache, Plan
    from .datasets import Catalog
    from .trace import Recorder

log = logging.getLogger(__name__)


class _NoResumeHint(logging.Filter):
    """After a failure Kedro suggests `kedro run --from-nodes ...`: not a kmrun command."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "--from-nodes" not in message and "Repeat the previous command" not in message


for _name in ("kedro.runner.runner", "kedro.runner.sequential_runner", "kedro.runner.parallel_runner",
              "kedro.runner.thread_runner"):
    logging.getLogger(_name).addFilter(_NoResumeHint())

KEDRO_MLFLOW = ("kedro-mlflow", "kedro_mlflow")  # Kedro compares either spelling of the distribution


@dataclass
class KedroRun:
    """What one pipeline run left behind that kmrun needs. Filled in as the run goes, so
    that a failed run still tells which parameters it resolved."""

    run_id: str
    mlflow_run_id: str = ""  # the run the outputs are recorded in (a cache entry's source)
    capture: set[str] = field(default_factory=set)  # datasets to keep, by name
    output_dir: Path | None = None  # where written files go; None: the project's own paths
    params: dict[str, Any] | None = None  # every parameter Kedro resolved, once the catalog exists
    cache: NodeCache | None = None  # where to store the outputs of the nodes that run
    plan: Plan | None = None  # what the cache serves; None: every node runs, nothing is stored
    not_cached: dict[str, str] = field(default_factory=dict)  # node -> why its outputs were not stored
    datasets: dict[str, Any] = field(default_factory=dict)  # captured outputs, by dataset name
    saved: list[str] = field(default_factory=list)  # every dataset the run saved, in order
    written: dict[str, str] = field(default_factory=dict)  # dataset -> file it was written to


class _Hooks:
    """kmrun's Kedro hooks, for the one run this process is doing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.record: KedroRun | None = None
        self.outputs: set[str] = set()
        self.recorder: Recorder | None = None  # made on the first node whose outputs are stored
        self.recording: str | None = None  # the node being recorded

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version):  # type: ignore[no-untyped-def]
        if self.record is None:
            return
        self.record.params = dict(parameters.get("parameters", {}))
        catalog_log = logging.getLogger("kedro.io.data_catalog")
        level = catalog_log.level
        catalog_log.setLevel(logging.ERROR)  # "Replacing dataset" is what we mean to do
        try:
            if self.record.output_dir is not None:
                self._redirect(catalog, conf_catalog, save_version, self.record)
            if self.record.plan is not None and self.record.plan.inject:
                self._hand_on(catalog, self.record.plan.inject)
        finally:
            catalog_log.setLevel(level)

    @staticmethod
    def _hand_on(catalog: Any, values: dict[str, Any]) -> None:
        """Give the nodes that run what a run of the cached nodes would have given them: each
        cached output is saved through its dataset (after the redirect: in this job's folder),
        and the node that reads it loads it back as in a run (a CSV without its index, a
        dtype from ``load_args``). Outputs with no dataset in the catalog stay in memory."""
        from kedro.io import MemoryDataset

        for name, value in values.items():
            dataset = catalog.get(name) if name in catalog else None
            if dataset is None or isinstance(dataset, MemoryDataset):
                catalog[name] = MemoryDataset(value)
            else:
                dataset.save(value)

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str, node: Any) -> None:
        self._record(node)  # a project dataset's load() runs project code for the node

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        self._record(node)
        if self.recording == node.name and self.recorder is not None:
            self.recorder.io = True  # what the node itself opens and reads; its inputs are keyed already

    def _record(self, node: Any) -> None:
        record = self.record
        if record is None or record.plan is None or record.cache is None or self.recording is not None \
                or record.plan.keys.get(node.name) is None:
            return
        if sys.gettrace() is not None:  # a debugger or coverage: kmrun's recording would take its place
            record.not_cached[node.name] = "another tracer (a debugger, coverage) is active, so what it ran is unknown"
            return
        if self.recorder is None:
            from .trace import Recorder, install

            install()
            self.recorder = Recorder(self.root)
        self.recorder.start(ignore=[record.cache.root, record.output_dir])
        self.recording = node.name

    @hook_impl
    def on_node_error(self, node: Any) -> None:
        if self.recording is not None and self.recorder is not None:
            self.recorder.abandon()
        self.recording = None

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        record = self.record
        ran = None
        if self.recording == node.name and self.recorder is not None and record is not None \
                and record.cache is not None:
            ran = self.recorder.stop(record.cache.salt())
        self.recording = None
        if record is None or record.plan is None or record.cache is None:
            return
        from .cache import token

        plan = record.plan
        key = plan.keys.get(node.name)
        if key is not None and node.name not in record.not_cached:
            inputs = {name: plan.tokens[name] for name in node.inputs if name in plan.tokens}
            reason = record.cache.put(key, node.name, outputs, record.mlflow_run_id, plan.parts.get(node.name), ran,
                                      inputs)
            if reason is not None:
                record.not_cached[node.name] = reason
            else:
                plan.tokens.update({name: token(key, ran) for name in node.outputs})

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        if self.record is None:
            return
        self.record.saved.append(dataset_name)
        if dataset_name in self.record.capture:
            self.record.datasets[dataset_name] = data

    def _redirect(self, catalog: Any, conf_catalog: dict[str, Any], save_version: str, record: KedroRun) -> None:
        from kedro.io import AbstractDataset

        assert record.output_dir is not None
        resolver = getattr(catalog, "config_resolver", None)
        for name in sorted(self.outputs):
            conf = conf_catalog.get(name)
            if conf is None and resolver is not None:  # named by a dataset factory pattern
                conf = resolver.resolve_pattern(name)
            inner = conf.get("dataset") if isinstance(conf, dict) else None  # a wrapper: kedro-mlflow's
            key = next((k for k in ("filepath", "path") if isinstance(conf, dict) and isinstance(conf.get(k), str)),
                       None)  # a folder dataset (PartitionedDataset) says `path`
            where = conf if key else (inner if isinstance(inner, dict) and "filepath" in inner else None)
            key = key or "filepath"
            if where is None or not isinstance(conf, dict):
                continue
            original = Path(str(where[key]))
            try:
                relative = original.relative_to(self.root)
            except ValueError:  # an absolute path outside the project: still keep jobs apart
                relative = Path(original.name)
            target = record.output_dir / relative
            moved = {**conf, key: target.as_posix()} if where is conf else {
                **conf, "dataset": {**where, "filepath": target.as_posix()}}
            catalog[name] = AbstractDataset.from_config(name, moved, save_version=save_version)
            record.written[name] = target.as_posix()


class KedroProject:
    """A Kedro project bootstrapped in this process, and one session to run it.

    The session and the pipelines are kept for the life of the process; the parameters
    are read again after ``refresh()`` (kmrun calls it at the start of every run or sweep).
    """

    def __init__(self, root: Path, env: str | None) -> None:
        self.root = root
        self.env = env
        self.package_name = read_package_name(root)
        self._check_env(env)
        from kedro.framework.session import KedroServiceSession
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(root)
        from kedro.framework.project import settings

        self.env_name: str = env or settings.CONFIG_LOADER_ARGS.get("default_run_env") or "local"
        self._hooks = _Hooks(root)
        saved = {key: getattr(settings, key) for key in ("HOOKS", "DISABLE_HOOKS_FOR_PLUGINS")}
        # kmrun owns the MLflow run: kedro-mlflow's hook would open a second one.
        settings.set("HOOKS", (*saved["HOOKS"], self._hooks))
        settings.set("DISABLE_HOOKS_FOR_PLUGINS", (*saved["DISABLE_HOOKS_FOR_PLUGINS"], *KEDRO_MLFLOW))
        try:
            # Kedro imports every installed plugin here (kedro-mlflow too, though kmrun turns it
            # off); their import-time warnings are not the user's, so they are kept at DEBUG.
            with warnings.catch_warnings(record=True) as caught, _blocked_before_import(KEDRO_MLFLOW):
                self.session: KedroServiceSession = KedroServiceSession.create(project_path=root, env=env)
            for warning in caught:
                log.debug("While loading Kedro's plugins: %s", warning.message)
        finally:  # only kmrun's session is changed, not the project's settings
            for key, value in saved.items():
                settings.set(key, value)
        if _installed("kedro_mlflow"):
            log.info("kedro-mlflow's hook is off for kmrun runs: kmrun records the MLflow run.")
        parsed, make_loader = ParsedConfig(), self.session._get_config_loader
        self.session._get_config_loader = (  # type: ignore[method-assign]
            lambda runtime_params=None: parsed.attach(make_loader(runtime_params)))
        self._params: dict[str, Any] | None = None
        self._catalog: Catalog | None = None
        self._runtime_catalog = False  # whether catalog entries read ${runtime_params:...}
        self._job_catalogs: dict[str, Catalog] = {}
        self._credentials: dict[str, Any] | None = None
        self._job_params: dict[str, dict[str, Any]] = {}
        self._typed: dict[str, bool] = {}  # pipeline -> whether a node of it takes typed parameters

    def refresh(self) -> None:
        """Forget what was read from the project's config files."""
        self._params = None
        self._catalog = None
        self._job_catalogs.clear()
        self._credentials = None
        self._job_params.clear()

    def job_params(self, overrides: dict[str, Any] | None, pipeline: str = "__default__",
                   typed: bool = False) -> dict[str, Any]:
        """The parameters of a run with ``overrides`` as runtime params, as Kedro resolves them:
        ``${runtime_params:...}``, globals and custom resolvers included. With ``typed``, as the
        nodes receive them: a section a node annotates with a dataclass or pydantic model is that
        object (Kedro's own validation; a value it rejects raises ``ParamError``)."""
        slot = json.dumps([overrides or {}, pipeline, typed], sort_keys=True, default=repr)
        hit = self._job_params.get(slot)
        if hit is not None:
            return hit
        if len(self._job_params) > 512:
            self._job_params.clear()
        if not overrides:
            raw = self.parameters()
        else:
            try:
                raw = dict(self.session._get_config_loader(overrides)["parameters"])
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ProjectError(f"Kedro cannot resolve the parameters of {self.root} (env {self.env_name}) "
                                   f"with the overrides {overrides}: {first}") from None
        out = self._validated(raw, pipeline) if typed else raw
        self._job_params[slot] = out
        return out

    def _validated(self, raw: dict[str, Any], pipeline: str) -> dict[str, Any]:
        """Kedro's validation of typed parameters, scoped as ``session.run`` scopes it."""
        try:
            from kedro.validation.parameter_validator import ParameterValidator
        except ImportError:  # Kedro before typed parameters
            return raw
        from kedro.framework.project import pipelines

        scope = dict(pipelines) if pipeline == "__default__" else {pipeline: pipelines[pipeline]}
        validator = ParameterValidator(scope)
        if not self._typed.setdefault(pipeline, bool(validator.type_extractor.extract_types_from_pipelines())):
            return raw
        try:
            return validator.validate_raw_params(raw)
        except Exception as err:
            if type(err).__name__ != "ParameterValidationError":
                raise
            raise ParamError(
                f"params: Kedro's typed parameters of pipeline '{pipeline}' reject the values: {err}\n"
                "Fix the parameter (its YAML, or the params.* override) to fit the type the node's argument "
                "is annotated with."
            ) from None

    def catalog(self, params: dict[str, Any] | None = None) -> Catalog:
        """The project's catalog for this env, as Kedro resolves it for a run with
        ``params`` as runtime params (factory patterns are matched on demand)."""
        from .datasets import Catalog

        if self._catalog is None:
            self._catalog = Catalog(self.session.load_context().config_loader["catalog"], self.root)
            self._runtime_catalog = any("runtime_params" in p.read_text(encoding="utf-8", errors="replace")
                                        for folder in ("base", self.env_name)
                                        for p in (self.root / "conf" / folder).rglob("catalog*"))
        if not params or not self._runtime_catalog:
            return self._catalog
        key = json.dumps(params, sort_keys=True, default=repr)
        if key not in self._job_catalogs:
            loader = self.session._get_config_loader(params)
            self._job_catalogs[key] = Catalog(loader["catalog"], self.root)
        return self._job_catalogs[key]

    def filepath(self, name: str, params: dict[str, Any] | None = None) -> str | None:
        """Where a dataset's local file or folder is (absolute), or None when it has none."""
        where = self.catalog(params).location(name)
        return str(where) if isinstance(where, Path) else None

    def save_copy(self, name: str, value: Any, folder: Path, params: dict[str, Any] | None = None) -> Path:
        """Save ``value`` as dataset ``name`` would, but under ``folder``; returns the file."""
        from kedro.io import AbstractDataset

        catalog = self.catalog(params)
        entry, where = catalog.entry(name) or {}, catalog.location(name)
        entry.pop("credentials (name)", None)  # a local file
        assert isinstance(where, Path), f"{name} has no local file"
        target = folder / where.name
        key = "filepath" if "filepath" in entry else "path"
        AbstractDataset.from_config(name, {**entry, key: target.as_posix()}).save(value)
        return target

    def load(self, name: str) -> Any:
        """A catalog dataset's data, loaded as Kedro loads it."""
        return self.session.load_context().catalog.load(name)

    def parameters(self) -> dict[str, Any]:
        """The project's parameters for this env, before any kmrun override, as plain values
        (typed sections as the dicts they are written as)."""
        if self._params is None:
            from kedro.config import MissingConfigException

            try:
                self._params = dict(self.session._get_config_loader()["parameters"])
            except MissingConfigException:  # a project without parameters files, as Kedro takes it
                self._params = {}
            except RecursionError:
                raise ProjectError(
                    f"Kedro cannot load the parameters of {self.root} (env {self.env_name}): they nest deeper than "
                    f"its config loader can follow (Python's recursion limit, {sys.getrecursionlimit()} frames; about "
                    "100 levels). Flatten the deepest section of the parameters files."
                ) from None
            except Exception as err:  # a duplicate key, a resolver that fails, a YAML error: the project's config
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ProjectError(f"Kedro cannot load the parameters of {self.root} (env {self.env_name}): "
                                   f"{first}\nFix the project's parameters files under {self.root / 'conf'}.") from None
        return self._params

    def credentials(self) -> dict[str, Any]:
        """The project's credentials, only so that their values can be redacted.

        No credentials file is fine; one that cannot be read stops kmrun, since it could
        not keep those secrets out of MLflow."""
        from kedro.config import MissingConfigException

        if self._credentials is not None:
            return self._credentials
        try:
            self._credentials = dict(self.session.load_context().config_loader["credentials"])
        except MissingConfigException:
            self._credentials = {}
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ProjectError(
                f"Cannot read the Kedro credentials of {self.root} (env {self.env_name}): {first}\n"
                "kmrun reads them to keep their values out of MLflow. Fix the credentials file "
                "(or set the environment variables it reads)."
            ) from None
        return self._credentials

    def pipeline(self, name: str, tags: list[str]) -> Pipeline:
        """The named pipeline, filtered by tags; a ``ProjectError`` names the known ones."""
        from kedro.framework.project import pipelines

        try:
            pipelines.set_requested([name])  # Kedro then imports only this pipeline's modules
            found = name in pipelines
        except Exception:  # no module of that name: said below, with the names there are
            found = False
        if not found:
            pipelines.set_requested(None)
            try:
                names = sorted(pipelines.keys())
            except Exception as err:
                raise ProjectError(f"Kedro could not load the pipelines of {self.root}: {err}") from err
            close = get_close_matches(name, names, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ProjectError(
                f"kedro.pipeline: no pipeline named '{name}' in {self.root}.{hint}\n"
                f"Registered pipelines: {', '.join(names)}."
            )
        pipeline = pipelines[name]
        if tags:
            pipeline = pipeline.only_nodes_with_tags(*tags)
            if not pipeline.nodes:
                raise ProjectError(f"kedro.tags {list(tags)} select no node of pipeline '{name}'.")
        return pipeline

    def run(self, record: KedroRun, params: dict[str, Any], pipeline: str = "__default__",
            tags: list[str] | None = None) -> KedroRun:
        """Run ``pipeline`` with ``params`` deep-merged into the project's parameters,
        filling in ``record`` as it goes. Raises what the pipeline raised."""
        selected = self.pipeline(pipeline, list(tags or []))
        plan = record.plan
        if plan is not None:  # captured outputs of cached nodes are read from the cache
            for entry in plan.hits.values():
                record.datasets.update({k: v for k, v in entry.outputs.items() if k in record.capture})
            if not plan.run:  # every node is served by the cache; the project's pipeline hooks still run
                self._pipeline_hooks(record, params, pipeline, selected)
                return record
        self._hooks.record, self._hooks.outputs = record, set(selected.all_outputs())
        try:
            self.session.run(run_id=record.run_id, pipeline_names=[pipeline], tags=tags or None,
                             runtime_params=params or None,
                             node_names=plan.run if plan and len(plan.run) < len(selected.nodes) else None)
        finally:
            if self._hooks.recording is not None and self._hooks.recorder is not None:  # Ctrl-C inside a node
                self._hooks.recorder.abandon()
            self._hooks.record, self._hooks.recording = None, None
        return record

    def _pipeline_hooks(self, record: KedroRun, params: dict[str, Any], name: str, selected: Pipeline) -> None:
        """Call the project's ``before_pipeline_run`` and ``after_pipeline_run`` hooks, as a run
        would, for a job whose nodes were all served by the cache (nothing, when the project
        has no such hook)."""
        manager = self.session._hook_manager
        hooks = (manager.hook.before_pipeline_run, manager.hook.after_pipeline_run)
        if not any(impl.plugin is not self._hooks for hook in hooks for impl in hook.get_hookimpls()):
            return
        context = self.session.load_context(params or None)
        catalog = context._get_catalog(save_version=record.run_id)
        from kedro import __version__ as kedro_version

        run_params = {"session_id": self.session.session_id, "run_id": record.run_id,
                      "project_path": self.root.as_posix(), "env": self.env_name, "kedro_version": kedro_version,
                      "tags": None, "from_nodes": None, "to_nodes": None, "node_names": [], "from_inputs": None,
                      "to_outputs": None, "load_versions": None, "runtime_params": params or {},
                      "pipeline_names": [name], "namespaces": None, "runner": "SequentialRunner",
                      "only_missing_outputs": False}
        manager.hook.before_pipeline_run(run_params=run_params, pipeline=selected, catalog=catalog)
        manager.hook.after_pipeline_run(run_params=run_params, run_result={}, pipeline=selected, catalog=catalog)

    def _check_env(self, env: str | None) -> None:
        if env is None:
            return
        conf = self.root / "conf"
        if not (conf / env).is_dir():
            envs = sorted(p.name for p in conf.iterdir() if p.is_dir()) if conf.is_dir() else []
            raise ProjectError(
                f"kedro.env: no environment '{env}' in {conf}. Available: {', '.join(envs) or 'none'}."
            )


@contextmanager
def _blocked_before_import(distributions: tuple[str, ...]) -> Iterator[None]:
    """Kedro imports a plugin's hooks before it drops those of a disabled plugin: kedro-mlflow's
    import alone takes 1.7 s and 50 MB (it imports MLflow). Here the hooks of ``distributions``
    are blocked by name first, so that they are never imported. Falls back to Kedro's own
    order if Kedro's private ``_register_hooks_entry_points`` is not where it was."""
    import importlib.metadata

    from kedro.framework.session import service_session

    original = getattr(service_session, "_register_hooks_entry_points", None)
    if original is None:
        yield
        return

    def register(hook_manager: Any, disabled: Any) -> None:
        for name in distributions:
            try:
                points = importlib.metadata.distribution(name).entry_points
            except importlib.metadata.PackageNotFoundError:
                continue
            for point in points.select(group="kedro.hooks"):
                hook_manager.set_blocked(point.name)
        original(hook_manager, disabled)

    service_session._register_hooks_entry_points = register  # type: ignore[assignment]
    try:
        yield
    finally:
        service_session._register_hooks_entry_points = original


def read_package_name(root: Path) -> str:
    """``[tool.kedro] package_name`` of the project at ``root``."""
    pyproject = root / "pyproject.toml"
    fix = (
        "Set kedro.project_path in conf/kmrun.yaml (or on the command line, "
        "kedro.project_path=PATH) to the folder that holds the project's pyproject.toml."
    )
    if not pyproject.is_file():
        raise ProjectError(f"kedro.project_path: {root} is not a Kedro project (no pyproject.toml).\n{fix}")
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        return str(data["tool"]["kedro"]["package_name"])
    except (tomllib.TOMLDecodeError, KeyError):
        raise ProjectError(
            f"kedro.project_path: {pyproject} has no [tool.kedro] package_name, "
            f"so {root} is not a Kedro project.\n{fix}"
        ) from None


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
