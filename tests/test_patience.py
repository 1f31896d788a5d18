"""Patience with a store that is away: what counts as away, waiting, giving up, and a
wrong call that fails at once (fast: a fake clock, no store)."""

from __future__ import annotations

import pytest

from runner import patience
from runner.errors import StoreUnavailable


class Flaky:
    """Fails ``times`` times with ``error``, then answers."""

    def __init__(self, times: int, error: Exception) -> None:
        self.times, self.error, self.calls = times, error, 0

    def __call__(self, value: int) -> int:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return value * 2


@pytest.fixture
def clock(monkeypatch):
    """Sleeping advances a fake monotonic clock instead."""
    now = [0.0]
    monkeypatch.setattr(patience.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(patience.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(patience, "_given_up", set())
    patience.configure(10)
    yield now
    patience.configure(patience.PATIENCE)


def wrapped(message: str) -> Exception:
    """An error as MLflow or Optuna raise it: their own type, the driver's error as its cause."""
    try:
        try:
            raise OSError(message)
        except OSError as inner:
            raise RuntimeError("An exception is raised during the commit.") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("message", [
    'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
    "terminating connection due to administrator command",
    "the database system is starting up",
    "HTTPConnectionPool(host='x', port=5000): Max retries exceeded with url: /api",
    "server closed the connection unexpectedly",
])
def test_errors_that_say_the_store_is_away_are_waited_out(clock, caplog, message):
    flaky = Flaky(3, wrapped(message))
    assert patience.call("db", flaky, 21) == 42 and flaky.calls == 4
    assert "stopped answering" in caplog.text and "answers again" in caplog.text


@pytest.mark.parametrize("message", ["no such table: runs", "database is locked", "RESOURCE_DOES_NOT_EXIST: run x"])
def test_a_wrong_call_fails_at_once(clock, message):
    flaky = Flaky(1, wrapped(message))
    with pytest.raises(RuntimeError):
        patience.call("db", flaky, 1)
    assert flaky.calls == 1 and clock[0] == 0


def test_a_store_away_longer_than_the_patience_raises_and_later_calls_do_not_wait_again(clock):
    flaky = Flaky(10**6, wrapped("Connection refused"))
    with pytest.raises(StoreUnavailable, match=r"did not come back within 10 s \(store_patience\)"):
        patience.call("postgresql://u@h/db", flaky, 1)
    assert 10 <= clock[0] < 11
    before = clock[0]
    with pytest.raises(StoreUnavailable):
        patience.call("postgresql://u@h/db", flaky, 1)  # given up: one try, no second wait
    assert clock[0] == before
    flaky.times = 0
    assert patience.call("postgresql://u@h/db", flaky, 1) == 2  # it came back: patient again


def test_a_patient_client_wraps_methods_and_passes_attributes():
    class Client:
        tracking_uri = "sqlite:///x.db"

        def get(self, key, default=None):
            return key, default

    client = patience.Patient(Client(), "x")
    assert client.tracking_uri == "sqlite:///x.db" and client.get("k", default=1) == ("k", 1)
