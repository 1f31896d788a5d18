"""kmrun register, models, serve, ui and dashboard: MLflow's Model Registry, and the
servers kmrun starts (a model's scoring server, MLflow's UI, optuna-dashboard) on the
store conf/kmrun.yaml names. Models are logged by jobs (``models``); these commands only
read them, register them and serve them."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KmrunError
from .processes import serve as run_server
from .redact import hide_password
from .storage import default_storage
from .store import open_store, resolve_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from .store import Store


def _check_alias(alias: str) -> None:
    """MLflow's own rules for an alias (characters, length, reserved names), as a KmrunError."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    try:
        validation._validate_model_alias_name(alias)
        reserved = getattr(validation, "_validate_model_alias_name_reserved", None)  # split out in MLflow 3.x
        if reserved is not None:
            reserved(alias)
    except MlflowException as err:
        shown = alias if len(alias) <= 40 else alias[:40] + "…"
        raise KmrunError(f"--alias '{shown}': {err.message.rstrip('.')}. Use letters, digits, '_' and '-', "
                         "not 'latest' nor 'v' followed by digits (e.g. --alias champion).") from None


def register(args: argparse.Namespace) -> int:
    from . import terminal
    from .models import register as register_model
    from .runtime import current

    if args.alias is not None:
        _check_alias(args.alias)  # before anything is registered: a bad alias must leave no new version
    store = open_store(args)
    client = store.client()
    run = resolve_run(client, store, args.run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    version = register_model(current().tracker(store.uri, experiment), run.info.run_id, args.name, args.alias)
    alias = f", alias {args.alias}" if args.alias else ""
    terminal.say(f"Registered run {run.info.run_id} as {args.name} version {version}{alias}.\n"
                 f"serve it: kmrun serve {args.name}/{version}")
    return 0


def models(args: argparse.Namespace) -> int:
    import json

    from . import terminal

    store = open_store(args)
    client = store.client()
    rows = []
    for model in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            metrics = {}
            if version.run_id:
                try:
                    metrics = client.get_run(version.run_id).data.metrics
                except Exception:  # the run was deleted: the version stays listed
                    metrics = {}
            rows.append({"name": model.name, "version": int(version.version),
                         "aliases": ",".join(aliases.get(str(version.version), [])), "run_id": version.run_id or "",
                         "status": version.status, "metric": metrics.get(store.metric or ""),
                         "metrics": metrics})
    rows.sort(key=lambda r: (r["name"], -r["version"]))
    if not rows:
        raise KmrunError(f"No registered models in {hide_password(store.uri)}. Register one with: "
                         "kmrun register RUN --name NAME (or study.register_best: NAME)")
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    terminal.models_table(rows, store.metric or "metric")
    return 0


QUIET_LOGGING = """\
version: 1
disable_existing_loggers: false
handlers:
  console: {class: logging.StreamHandler, level: WARNING}
loggers:
  kedro: {level: WARNING}
root: {handlers: [console], level: WARNING}
"""


def serve(args: argparse.Namespace) -> int:
    import socket

    from . import terminal
    from .models import MODEL_PATH, MODEL_TAG

    store = open_store(args)
    client = store.client()
    uri = _model_uri(client, store, args.model, MODEL_PATH, MODEL_TAG)
    with socket.socket() as probe:
        if probe.connect_ex((args.host, args.port)) == 0:
            raise KmrunError(f"--port {args.port}: something already listens on {args.host}:{args.port}. "
                             "Pick another port: kmrun serve ... --port 5002")
    terminal.say(f"Serving {uri} on http://{args.host}:{args.port}/invocations (Ctrl-C stops it)")
    with tempfile.TemporaryDirectory(prefix="kmrun-serve-") as folder:
        from mlflow.artifacts import download_artifacts
        from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH

        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        model = download_artifacts(uri, dst_path=folder, tracking_uri=store.uri)
        quiet = Path(folder) / "logging.yml"  # a packaged model boots Kedro: its INFO lines are not the server's
        quiet.write_text(QUIET_LOGGING, encoding="utf-8")
        env = {"KEDRO_LOGGING_CONFIG": str(quiet), **os.environ, "MLFLOW_TRACKING_URI": store.uri,
               _SERVER_MODEL_PATH: model}
        command = [sys.executable, "-m", "uvicorn", "--host", args.host, "--port", str(args.port),
                   "--log-level", "warning", "runner.serving:app"]
        return run_server(command, env)


def _model_uri(client: MlflowClient, store: Store, given: str, path: str, tag: str) -> str:
    """``models:/...`` for a registered name (checked), ``runs:/<id>/model`` for a run."""
    from mlflow.exceptions import MlflowException

    name = given.split("@", 1)[0].split("/", 1)[0]
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        registered = None
    if registered is not None:
        if "@" in given:
            alias = given.split("@", 1)[1]
            if alias not in (registered.aliases or {}):
                raise KmrunError(f"Model {name} has no alias '{alias}'. Its aliases: "
                                 f"{', '.join(registered.aliases or {}) or 'none'}. Set one: kmrun register RUN "
                                 f"--name {name} --alias {alias}")
            return f"models:/{given}"
        if "/" in given:
            version = given.split("/", 1)[1]
            known = [v.version for v in client.search_model_versions(f"name = '{name}'")]
            if version not in [str(v) for v in known]:
                raise KmrunError(f"Model {name} has no version {version}. Its versions: "
                                 f"{', '.join(str(v) for v in sorted(known, key=int))}.")
            return f"models:/{given}"
        latest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        return f"models:/{name}/{latest}"
    try:
        run = resolve_run(client, store, given)
    except KmrunError:
        raise KmrunError(f"'{given}' is neither a registered model nor a run id in {hide_password(store.uri)}. "
                         "List them: kmrun models, kmrun runs") from None
    if tag not in run.data.tags:
        raise KmrunError(f"Run {run.info.run_id} has no model. Set model.dataset (or model.pipeline) in the "
                         "config and run again.")
    return f"runs:/{run.info.run_id}/{path}"


# --- ui, dashboard --------------------------------------------------------------------


def ui(args: argparse.Namespace) -> int:
    store = open_store(args)
    from . import terminal

    terminal.say(f"MLflow UI on http://{args.host}:{args.port} for {hide_password(store.uri)} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store.uri,
               "--host", args.host, "--port", str(args.port)]
    return run_server(command)


def dashboard(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise KmrunError("kmrun dashboard needs optuna-dashboard, which is not installed. "
                         "Install it: pip install optuna-dashboard")
    storage = args.storage or default_storage(open_store(args).uri)
    if storage is None:
        raise KmrunError("kmrun dashboard: the MLflow store is not a local file, so the study storage has no "
                         "default; pass it: --storage postgresql://USER@HOST/DB (your study.storage)")
    # optuna-dashboard's public entry point (the package has no __main__ to run with -m)
    serve_it = "import sys, optuna_dashboard; optuna_dashboard.run_server(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    command = [sys.executable, "-c", serve_it, storage, args.host, str(args.port)]
    return run_server(command)
