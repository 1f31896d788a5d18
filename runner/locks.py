"""Locks that keep concurrent kmrun processes apart, on one host or many.

``creation_lock`` serializes creating or migrating a store: a file lock beside a local
SQLite file, an advisory lock inside a PostgreSQL database. ``RunLocks`` lets a process
say, for as long as it lives, that it owns a run (PostgreSQL drops the lock with the
connection), so another host can tell a dead owner's grid cell from a live one's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import patience
from .redact import hide_password


@contextmanager
def creation_lock(url: str, patient: bool = True) -> Iterator[None]:
    """Hold an exclusive lock while a store is created or migrated, so that processes
    starting at once on an empty store do not race each other's schema creation: a file
    lock beside a local SQLite file, an advisory lock in a PostgreSQL database (every host
    sees it). Other URLs take no lock. Without ``patient`` (opening a store), a database
    that does not answer fails at once instead of being waited for (store_patience)."""
    if url.startswith("sqlite:///"):
        with _file_lock(Path(url.removeprefix("sqlite:///").split("?", 1)[0])):
            yield
    elif url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        with _advisory_lock(url, patient):
            yield
    else:
        yield


class RunLocks:
    """Session-level PostgreSQL advisory locks, one per run a process owns. PostgreSQL
    releases them when the owner's connection ends (its process died, on any host), which
    is how another host tells a dead owner from a live one without heartbeats of its own."""

    def __init__(self, url: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._engine = sqlalchemy.create_engine(url.replace("postgres://", "postgresql://", 1), poolclass=NullPool)
        self._held: dict[str, Any] = {}
        self._store = hide_password(url)

    @staticmethod
    def _key(run_id: str) -> int:
        return int(run_id[:15], 16)  # 60 bits: a bigint

    def hold(self, run_id: str) -> None:
        self._held[run_id] = patience.call(self._store, _locked, self._engine, self._key(run_id))

    def release(self, run_id: str) -> None:
        connection = self._held.pop(run_id, None)
        if connection is not None:
            connection.close()  # the session ends, and its lock with it

    def free(self, run_id: str) -> bool:
        """Whether nobody holds the run's lock (its owner is gone)."""
        return patience.call(self._store, self._free, self._key(run_id))

    def _free(self, key: int) -> bool:
        import sqlalchemy

        with self._engine.connect() as connection:
            got = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
            if got:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        return bool(got)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    from filelock import FileLock  # flock on POSIX, as before; Windows too

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        yield


CREATION_LOCK_KEY = 0x6B6D72756E  # "kmrun": one advisory lock id, shared by every kmrun process


@contextmanager
def _advisory_lock(url: str, patient: bool) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url.replace("postgres://", "postgresql://", 1), poolclass=NullPool)
    try:
        connection = patience.call(hide_password(url), _locked, engine, CREATION_LOCK_KEY) if patient else \
            _locked(engine, CREATION_LOCK_KEY)
        try:
            yield
        finally:
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": CREATION_LOCK_KEY})
            except sqlalchemy.exc.DBAPIError as err:
                if not patience.away(err):
                    raise  # else the connection is gone, and the lock with it
            connection.close()
    finally:
        engine.dispose()


def _locked(engine: Any, key: int) -> Any:
    """A new connection that holds advisory lock ``key`` (waiting for it)."""
    import sqlalchemy

    connection = engine.connect()
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        connection.commit()
    except BaseException:
        connection.close()
        raise
    return connection
