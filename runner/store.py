"""The MLflow store a subcommand reads, as ``conf/kmrun.yaml`` and the environment name
it (``--tracking-uri``, ``MLFLOW_TRACKING_URI``), and finding runs in it: by a filter, or
by an id or a unique prefix of one. Bad input raises ``KmrunError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KmrunError, TrackingError
from .redact import hide_password
from .tracking import resolve_uri

if TYPE_CHECKING:
    import argparse

    from mlflow import MlflowClient
    from mlflow.entities import Run


@dataclass
class Store:
    """Where runs are, and how to judge them, as conf/kmrun.yaml and the environment say."""

    uri: str
    experiment: str | None
    metric: str | None
    direction: str
    conf_dir: Path
    constraints: list[str] = field(default_factory=list)  # objective.constraints: what a best run must meet

    def client(self) -> MlflowClient:
        """A client on the store, checked: a damaged store fails here with one message."""
        from mlflow import MlflowClient

        try:
            client = MlflowClient(tracking_uri=self.uri)
            client.search_experiments(max_results=1)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(
                f"Cannot read the MLflow store {hide_password(self.uri)}: {first}\n"
                "Is it an MLflow store, and whole? Point --tracking-uri (or MLFLOW_TRACKING_URI) at another one."
            ) from None
        return client


def open_store(args: argparse.Namespace) -> Store:
    from omegaconf import OmegaConf

    conf_dir, base, raw = composed_config(args)
    uri = args.tracking_uri or resolve_uri(OmegaConf.select(raw, "mlflow.tracking_uri"), base)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise KmrunError(
            f"No MLflow store at {hide_password(uri)}. Run an experiment first (kmrun +experiment=baseline), or point "
            "--tracking-uri, MLFLOW_TRACKING_URI or mlflow.tracking_uri in conf/kmrun.yaml at one."
        )
    experiment = OmegaConf.select(raw, "mlflow.experiment_name")
    if experiment is None and OmegaConf.select(raw, "kedro.project_path") is not None:
        from .kedro_bridge import read_package_name

        try:
            experiment = read_package_name(base / str(OmegaConf.select(raw, "kedro.project_path")))
        except KmrunError:
            experiment = None
    metric = OmegaConf.select(raw, "objective.metric")
    direction = OmegaConf.select(raw, "objective.direction") or "maximize"
    if isinstance(metric, (list, tuple)) or OmegaConf.is_list(metric):
        metric, direction = metric[0], direction[0] if OmegaConf.is_list(direction) else direction
    constraints = OmegaConf.select(raw, "objective.constraints") or []
    return Store(uri, experiment, metric, str(direction), conf_dir, [str(c) for c in constraints])


def composed_config(args: argparse.Namespace) -> tuple[Path, Path, Any]:
    """The config dir (-cp, else conf/ here or in a parent), the folder relative paths start
    from (as for a run), and its kmrun.yaml composed as a run composes it (its defaults
    list too), without overrides; empty where there is no kmrun.yaml."""
    from omegaconf import OmegaConf

    from .compose import Composer

    composer = Composer(Path(args.config_dir) if args.config_dir else None)
    if not (composer.config_dir / "kmrun.yaml").is_file():
        return composer.config_dir, composer.base_dir, OmegaConf.create({})
    with composer:
        return composer.config_dir, composer.base_dir, composer.compose([])


def experiment_ids(store: Store, client: MlflowClient, name: str | None) -> list[str]:
    """The named experiment, else the configured one if the store has it, else all."""
    known = {e.name: e.experiment_id for e in client.search_experiments()}
    if name is not None:
        if name not in known:
            raise KmrunError(f"--experiment: no experiment '{name}' in {hide_password(store.uri)}. "
                             f"Experiments: {', '.join(sorted(known)) or 'none'}.")
        return [known[name]]
    if store.experiment in known:
        return [known[str(store.experiment)]]
    return list(known.values())


def search(client: MlflowClient, ids: list[str], filter_string: str = "", order_by: list[str] | None = None,
           max_results: int = 1000) -> list[Run]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_runs(ids, filter_string, max_results=max_results, order_by=order_by or []))
    except MlflowException as err:
        message = str(err.message).strip().splitlines()[0]
        raise KmrunError(
            f"--filter {filter_string!r}" + (f" --sort {order_by[0]!r}" if order_by else "")
            + f": MLflow says: {message}\n"
            "MLflow's search syntax: metrics.accuracy > 0.9 and params.`model.C` = '0.1' and "
            "attributes.status = 'FINISHED' (params are strings; quote them). See "
            "https://mlflow.org/docs/latest/search-runs.html"
        ) from None


def resolve_run(client: MlflowClient, store: Store, prefix: str) -> Run:
    """A run by its id or a unique prefix of it: one query, whatever the store's size."""
    import re

    if not prefix.strip():
        raise KmrunError("Give a run id (or the start of one). List runs with: kmrun runs")
    ids = [e.experiment_id for e in client.search_experiments()]
    clean = re.fullmatch(r"[0-9a-fA-F]+", prefix) is not None
    matches = search(client, ids, f"attributes.run_id LIKE '{prefix.lower()}%'", max_results=7) if clean and ids else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        near = search(client, ids, f"attributes.run_id LIKE '{prefix[:2].lower()}%'", max_results=5) \
            if clean and ids and len(prefix) > 2 else []
        hint = f" Ids starting like it: {', '.join(r.info.run_id for r in near)}." if near else ""
        raise KmrunError(f"No run with id '{prefix}' in {hide_password(store.uri)}.{hint} List runs with: kmrun runs")
    raise KmrunError(
        f"Run id prefix '{prefix}' is ambiguous: {', '.join(r.info.run_id for r in matches[:6])}. Give more characters."
    )
