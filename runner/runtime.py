"""What kmrun keeps in a process between jobs and calls, and what it reads again.

Kept for the life of the process (costly to make, safe to reuse): the bootstrapped Kedro
projects, the MLflow stores and the Optuna storages. Read again at the start of every
``runner.run`` / ``runner.sweep`` call (``refresh``): the projects' parameters and the
git state, which a user may change between two calls in one notebook.

A forked worker inherits this object; ``after_fork`` drops the database connections it
inherited, as SQLAlchemy requires, so the worker opens its own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kedro_bridge import KedroProject
    from .tracking import Tracker


class Runtime:
    def __init__(self) -> None:
        self._projects: dict[tuple[Path, str | None], KedroProject] = {}
        self._trackers: dict[tuple[str, str], Tracker] = {}
        self._storages: dict[str, Any] = {}
        self._git: dict[Path, dict[str, str]] = {}
        self._fingerprints: dict[tuple[Any, ...], Any] = {}
        self._caches: dict[Path, Any] = {}

    def project(self, path: str | Path, env: str | None) -> KedroProject:
        """The bootstrapped project at ``path`` for ``env``; made once per process."""
        from .kedro_bridge import KedroProject

        root = Path(path).expanduser().resolve()
        if (root, env) not in self._projects:
            self._projects[(root, env)] = KedroProject(root, env)
        return self._projects[(root, env)]

    def tracker(self, uri: str, experiment_name: str) -> Tracker:
        """One ``Tracker`` per store and experiment; opening it checks the store."""
        from .tracking import Tracker

        if (uri, experiment_name) not in self._trackers:
            self._trackers[(uri, experiment_name)] = Tracker(uri, experiment_name)
        return self._trackers[(uri, experiment_name)]

    def storage(self, url: str, key: str = "study.storage") -> Any:
        """The Optuna storage at ``url`` (``key``: the setting that names it, for errors)."""
        from .storage import open_storage

        if url not in self._storages:
            self._storages[url] = open_storage(url, key)
        return self._storages[url]

    def git_tags(self, path: Path) -> dict[str, str]:
        """The git commit and dirty flag of the repository holding ``path``."""
        from .tracking import git_tags

        if path not in self._git:
            self._git[path] = git_tags(path)
        return self._git[path]

    def fingerprint(self, project: KedroProject, pipeline: str, tags: list[str],
                    params: dict[str, Any] | None = None) -> Any:
        """What a pipeline's result depends on besides the config (``fingerprint``);
        ``params`` matter only to a catalog that reads ``${runtime_params:...}``."""
        from . import fingerprint

        catalog = project.catalog(params)
        key = (project.root, project.env, pipeline, tuple(tags), id(catalog))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint.of_pipeline(
                project.pipeline(pipeline, tags), project.parameters(), catalog, project.root)
        return self._fingerprints[key]

    def node_cache(self, root: Path, max_gb: float) -> Any:
        """The node cache in ``root``; its in-memory entries are kept for the process."""
        from .cache import NodeCache

        if root not in self._caches:
            self._caches[root] = NodeCache(root, int(max_gb * 2**30))
        self._caches[root].max_bytes = int(max_gb * 2**30)
        return self._caches[root]

    def uses_mlflow(self, project: KedroProject) -> bool:
        """Whether the project's code or catalog logs to MLflow itself (read once per call)."""
        from .fingerprint import uses_mlflow

        key = (project.root, project.env, "uses_mlflow", ())
        if key not in self._fingerprints:
            self._fingerprints[key] = uses_mlflow(project.root, project.package_name, project.catalog().explicit)
        return bool(self._fingerprints[key])

    def refresh(self) -> None:
        """Forget what the user may have changed since the last call."""
        from . import deps

        self._git.clear()
        self._fingerprints.clear()
        deps.forget()
        for project in self._projects.values():
            project.refresh()

    def after_fork(self) -> None:
        """In a forked worker: drop every database connection inherited from the parent."""
        for storage in self._storages.values():
            engine = getattr(storage, "engine", None)  # RDBStorage's SQLAlchemy engine
            if engine is not None:
                engine.dispose(close=False)
        for engine in mlflow_engines():
            engine.dispose(close=False)


def mlflow_engines() -> list[Any]:
    """The SQLAlchemy engines MLflow's SQL store keeps, one per URI.

    MLflow has no public way to reach them: ``SqlAlchemyStore._engine_map`` (from MLflow
    3.2; ``_db_uri_sql_alchemy_engine_map`` before), which ``tests/test_imports.py`` checks
    so that it fails loudly if MLflow renames it."""
    store = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    if store is None:
        return []
    return list(engine_map(store.SqlAlchemyStore).values())


def engine_map(store_class: Any) -> dict[str, Any]:
    for name in ("_engine_map", "_db_uri_sql_alchemy_engine_map"):
        if isinstance(getattr(store_class, name, None), dict):
            return dict(getattr(store_class, name))
    raise AttributeError("MLflow's SqlAlchemyStore keeps its engines under a name kmrun does not know")


_CURRENT = Runtime()


def current() -> Runtime:
    """This process's runtime."""
    return _CURRENT
