"""Patience with a store that stops answering for a while: a database restarted, an
MLflow server redeployed, a network that drops for seconds.

Every call kmrun makes to the MLflow store or an Optuna storage goes through ``call``:
an error that says the store cannot be reached (not that the call was wrong) is tried
again with backoff for up to ``store_patience`` seconds, with a line saying kmrun waits.
A store back in time costs the wait and nothing else. One that stays away raises
``StoreUnavailable`` (exit 2), and from then on this process tries each call once, so
that ending its runs takes seconds, not another wait.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

PATIENCE = 120.0  # seconds: the default of ``store_patience``
_patience = PATIENCE
_given_up: set[str] = set()  # stores that outlasted the patience in this process

# What drivers and clients say when the store is away (PostgreSQL restarting or down, a
# closed connection, an MLflow server not listening), as opposed to a wrong call.
_AWAY = ("connection refused", "could not connect", "connection failed", "server closed the connection",
         "terminating connection", "the database system is starting up", "the database system is shutting down",
         "connection reset", "broken pipe", "max retries exceeded", "connection aborted", "remote end closed",
         "no connection to the server", "connection is closed", "consuming input failed", "connection timed out",
         "read timed out", "temporary failure in name resolution", "server is not accepting")

T = TypeVar("T")


def configure(seconds: float) -> None:
    """Set this process's patience (``store_patience``)."""
    global _patience
    _patience = float(seconds)


def away(err: BaseException) -> bool:
    """Whether ``err``, or an error it wraps, says the store cannot be reached now."""
    return _sign(err) is not None


def _sign(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that says the store is away, if one does."""
    if isinstance(err, StoreUnavailable):
        return None  # waited for already
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(sign in str(current).lower() for sign in _AWAY):
            return current
        current = current.__cause__ or current.__context__
    return None


def call(store: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, tried again while ``store`` (its URL, password hidden) is away."""
    started, since, delay = 0.0, "", 0.5
    while True:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if not away(err):
                raise
            now = time.monotonic()
            if not since:
                started, since = now, datetime.now().strftime("%H:%M:%S")
                if store not in _given_up:
                    log.warning("The store %s stopped answering at %s (%s); kmrun waits up to %.0f s for it "
                                "(store_patience).", store, since, _first_line(err), _patience)
            waited = now - started
            if store in _given_up or waited >= _patience:
                _given_up.add(store)
                raise StoreUnavailable(
                    f"The store {store} stopped answering at {since} and did not come back within {_patience:.0f} s "
                    f"(store_patience): {_first_line(err)}. Check that it runs and is reachable; give it more time "
                    "with store_patience=SECONDS.") from None
            time.sleep(min(delay, _patience - waited))
            delay = min(delay * 2, 8.0)
        else:
            if since:
                log.warning("The store %s answers again, after %.0f s.", store, time.monotonic() - started)
                _given_up.discard(store)
            return result


class Patient:
    """``target`` (an ``MlflowClient``) whose every method waits out an outage of ``store``."""

    def __init__(self, target: Any, store: str) -> None:
        self._target, self._store = target, store

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._target, name)
        return functools.partial(call, self._store, found) if callable(found) else found


def patient_storage(storage: T, store: str) -> T:
    """An Optuna storage whose every call waits out an outage of ``store``. Its methods are
    wrapped on the object itself, so it stays the class Optuna checks for (RDBStorage)."""
    import optuna

    names = {n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")}
    names |= {"record_heartbeat", "_get_stale_trial_ids"}  # heartbeats and failing stale trials
    for name in sorted(names - {"get_heartbeat_interval", "get_failed_trial_callback"}):
        found = getattr(storage, name, None)
        if callable(found):
            setattr(storage, name, functools.partial(call, store, found))
    return storage


def _first_line(err: BaseException) -> str:
    text = str(_sign(err) or err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
