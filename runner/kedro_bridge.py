"""Kedro: bootstrap a project once per process, then run it once per job.

A job gets a fresh run on one long-lived ``KedroServiceSession`` with the job's
parameters as runtime params. A hook captures the datasets kmrun needs (metrics),
the resolved parameters and the credentials (so they can be redacted), and moves
every file the pipeline writes into the job's own directory, so that parallel jobs
never overwrite each other. Inputs that the pipeline only reads stay shared.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedro.framework.hooks import hook_impl

from .errors import ProjectError

if TYPE_CHECKING:
    from kedro.framework.session import KedroServiceSession
    from kedro.pipeline import Pipeline

log = logging.getLogger(__name__)

_PROJECTS: dict[tuple[Path, str | None], KedroProject] = {}


def open_project(path: str | Path, env: str | None) -> KedroProject:
    """The bootstrapped project at ``path`` for ``env``; made once per process."""
    root = Path(path).expanduser().resolve()
    key = (root, env)
    if key not in _PROJECTS:
        _PROJECTS[key] = KedroProject(root, env)
    return _PROJECTS[key]


@dataclass
class KedroRun:
    """What one pipeline run left behind that kmrun needs."""

    run_id: str
    params: dict[str, Any]  # every resolved Kedro parameter of the run
    datasets: dict[str, Any]  # captured outputs, by dataset name
    saved: list[str]  # every dataset the run saved, in order
    written: dict[str, str] = field(default_factory=dict)  # dataset -> file it was written to


class _Capture:
    """Kedro hooks for one run at a time (a process runs one job at a time)."""

    def __init__(self) -> None:
        self.reset(set(), None, set())

    def reset(self, names: set[str], output_dir: Path | None, outputs: set[str]) -> None:
        self.names, self.output_dir, self.outputs = names, output_dir, outputs
        self.datasets: dict[str, Any] = {}
        self.saved: list[str] = []
        self.params: dict[str, Any] = {}
        self.credentials: dict[str, Any] = {}
        self.written: dict[str, str] = {}
        self.project_path: Path | None = None

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version):  # type: ignore[no-untyped-def]
        self.params = parameters.get("parameters", {})
        self.credentials = conf_creds or {}
        if self.output_dir is not None:
            self._redirect(catalog, conf_catalog, save_version)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        self.saved.append(dataset_name)
        if dataset_name in self.names:
            self.datasets[dataset_name] = data

    def _redirect(self, catalog: Any, conf_catalog: dict[str, Any], save_version: str) -> None:
        assert self.output_dir is not None and self.project_path is not None
        catalog_log = logging.getLogger("kedro.io.data_catalog")
        level = catalog_log.level
        catalog_log.setLevel(logging.ERROR)  # "Replacing dataset" is what we mean to do
        try:
            self._replace(catalog, conf_catalog, save_version)
        finally:
            catalog_log.setLevel(level)

    def _replace(self, catalog: Any, conf_catalog: dict[str, Any], save_version: str) -> None:
        from kedro.io import AbstractDataset

        assert self.output_dir is not None and self.project_path is not None
        for name in sorted(self.outputs):
            conf = conf_catalog.get(name)
            if not isinstance(conf, dict) or "filepath" not in conf:
                continue
            original = Path(str(conf["filepath"]))
            try:
                relative = original.relative_to(self.project_path)
            except ValueError:  # an absolute path outside the project: still keep jobs apart
                relative = Path(original.name)
            target = self.output_dir / relative
            catalog[name] = AbstractDataset.from_config(
                name, {**conf, "filepath": target.as_posix()}, save_version=save_version
            )
            self.written[name] = target.as_posix()


class KedroProject:
    """A Kedro project bootstrapped in this process, and one session to run it."""

    def __init__(self, root: Path, env: str | None) -> None:
        self.root = root
        self.env = env
        self.package_name = _read_metadata(root)
        self._check_env(env)
        from kedro.framework.session import KedroServiceSession
        from kedro.framework.startup import bootstrap_project

        bootstrap_project(root)
        from kedro.framework.project import settings

        self.env_name: str = env or settings.CONFIG_LOADER_ARGS.get("default_run_env") or "local"
        self.session: KedroServiceSession = KedroServiceSession.create(project_path=root, env=env)
        self._capture = _Capture()
        hooks = self.session._hook_manager  # no public way to add a hook to a session
        _drop_kedro_mlflow(hooks)
        hooks.register(self._capture)
        self._base_params: dict[str, Any] | None = None
        self._credentials: dict[str, Any] | None = None

    def parameters(self) -> dict[str, Any]:
        """The project's parameters for this env, before any kmrun override."""
        if self._base_params is None:
            self._base_params = dict(self.session.load_context().params)
        return self._base_params

    def credentials(self) -> dict[str, Any]:
        """The project's credentials, only so that their values can be redacted."""
        if self._credentials is None:
            try:
                self._credentials = dict(self.session.load_context().config_loader["credentials"])
            except Exception:  # no credentials file is fine
                self._credentials = {}
        return self._credentials

    def pipeline(self, name: str, tags: list[str]) -> Pipeline:
        """The named pipeline, filtered by tags; a ``ProjectError`` names the known ones."""
        from kedro.framework.project import pipelines

        pipelines.set_requested(None)
        if name not in pipelines:
            names = sorted(pipelines.keys())
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
                raise ProjectError(
                    f"kedro.tags {list(tags)} select no node of pipeline '{name}'."
                )
        return pipeline

    def run(
        self,
        params: dict[str, Any],
        pipeline: str = "__default__",
        tags: list[str] | None = None,
        capture: set[str] | None = None,
        output_dir: Path | None = None,
        run_id: str | None = None,
    ) -> KedroRun:
        """Run ``pipeline`` with ``params`` deep-merged into the project's parameters.

        Datasets named in ``capture`` are returned as saved. With ``output_dir``, every
        file dataset the pipeline writes goes below it instead of the project.
        """
        from kedro.io.core import generate_timestamp

        selected = self.pipeline(pipeline, list(tags or []))
        capture_set = set(capture or ())
        self._capture.reset(capture_set, output_dir, set(selected.all_outputs()))
        self._capture.project_path = self.root
        run_id = run_id or generate_timestamp()
        self.session.run(
            run_id=run_id,
            pipeline_names=[pipeline],
            tags=tags or None,
            runtime_params=params or None,
        )
        c = self._capture
        return KedroRun(run_id, c.params, dict(c.datasets), list(c.saved), dict(c.written))

    def _check_env(self, env: str | None) -> None:
        if env is None:
            return
        conf = self.root / "conf"
        if not (conf / env).is_dir():
            envs = sorted(p.name for p in conf.iterdir() if p.is_dir()) if conf.is_dir() else []
            raise ProjectError(
                f"kedro.env: no environment '{env}' in {conf}. "
                f"Available: {', '.join(envs) or 'none'}."
            )


def _read_metadata(root: Path) -> str:
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


def _drop_kedro_mlflow(hooks: Any) -> None:
    """kmrun owns the MLflow run; kedro-mlflow's hook would open a second one."""
    for plugin in list(hooks.get_plugins()):
        if type(plugin).__module__.split(".")[0] == "kedro_mlflow":
            hooks.unregister(plugin=plugin)
            log.info("kedro-mlflow's hook is off for kmrun runs: kmrun records the MLflow run.")
