"""Optuna storages: the default one beside the embedded MLflow store, and opening one
(with heartbeats, patience and a clear error)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TrackingError
from .liveness import in_worker, note_stale_trial
from .locks import creation_lock
from .patience import patient_storage
from .redact import Redactor, hide_password, url_password
from .tracking import driver_hint

if TYPE_CHECKING:
    import optuna

HEARTBEAT_SECONDS = 5  # a RUNNING trial whose process died is failed after GRACE_SECONDS
GRACE_SECONDS = 20
SQLITE_LOCK_TIMEOUT = 60  # seconds a writer waits for SQLite's lock before failing


@functools.cache
def _stale_callback_name() -> str:
    """Optuna 4.9 renamed ``failed_trial_callback`` (the older name warns from then on)."""
    import inspect

    import optuna

    known = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in known else "failed_trial_callback"


def default_storage(uri: str) -> str | None:
    """The Optuna storage a study uses when ``study.storage`` is null: ``optuna.db`` beside
    an SQLite MLflow store; None for a shared store."""
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return None


def open_storage(url: str, key: str = "study.storage") -> optuna.storages.BaseStorage:
    """An Optuna storage: a ``*.journal`` file, or any SQLAlchemy URL (with heartbeats,
    so that trials of a killed process can be failed)."""
    import optuna

    try:
        if url.endswith(".journal"):
            path = url.removeprefix("journal:").removeprefix("file://")
            backend = optuna.storages.journal.JournalFileBackend(path)  # type: ignore[attr-defined]
            return optuna.storages.JournalStorage(backend)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT}} if url.startswith("sqlite") else {}
        stale_callback: dict[str, Any] = {_stale_callback_name(): note_stale_trial}  # failed stale: trial.fail_dead
        with creation_lock(url, patient=in_worker()), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: not news
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs={**engine_kwargs, "pool_pre_ping": True},  # a restarted server's dead connections
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=GRACE_SECONDS,
                **stale_callback,
            )
        return patient_storage(storage, hide_password(url))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(
            f"{key}: cannot open the Optuna storage '{hide_password(url)}': "
            f"{Redactor([url_password(url)]).text(first)}{driver_hint(first)}\n"
            f"Use {NULL_STORAGE.get(key, 'null')}, an SQLAlchemy URL such as "
            "sqlite:///optuna.db or postgresql://HOST/DB, or a file ending in .journal."
        ) from None


NULL_STORAGE = {"study.storage": "null (optuna.db beside the MLflow store)",
                "sweep.storage": "null (the MLflow store coordinates the grid)"}
