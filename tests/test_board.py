"""A grid's cells on an Optuna storage (``sweep.storage``): a real SQLite storage, boards
standing for separate processes, and a real process that dies holding a cell."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from optuna.trial import TrialState

from runner.board import Board
from runner.records import Status


def board(tmp_path, since=None) -> Board:
    return Board(f"sqlite:///{tmp_path / 'grid.db'}", "key", since or datetime.datetime.now())


def test_processes_queue_each_cell_once_and_each_takes_a_different_one(tmp_path):
    one, two = board(tmp_path), board(tmp_path)
    assert one.queue(["a", "b", "c"]) == 3
    assert two.queue(["a", "b", "c"]) == 0  # queued already: not twice
    taken = [one.take({"a", "b", "c"}), two.take({"a", "b", "c"}), one.take({"a", "b", "c"})]
    assert sorted(cell for _, cell in taken) == ["a", "b", "c"]
    assert two.take({"a", "b", "c"}) is None  # nothing left to take
    trial_id, cell = taken[0]
    one.attach(trial_id, "run-1")
    one.end(trial_id, Status.FINISHED)
    settled = two.settled(["a", "b", "c"])
    assert list(settled) == [cell] and settled[cell].user_attrs["mlflow_run_id"] == "run-1"
    assert settled[cell].state == TrialState.COMPLETE
    assert two.queue(["a", "b", "c"]) == 0  # one ended, two run: nothing to queue
    one.close()


def test_a_failed_cell_stays_failed_but_an_interrupted_one_is_queued_again(tmp_path):
    one, two = board(tmp_path), board(tmp_path)
    one.queue(["a", "b"])
    first, second = one.take({"a", "b"}), one.take({"a", "b"})
    one.end(first[0], Status.FAILED)
    one.end(second[0], Status.KILLED)
    assert two.queue(["a", "b"]) == 1  # the interrupted one only
    assert two.take({"a", "b"})[1] == second[1]
    assert two.settled(["a", "b"])[first[1]].state == TrialState.FAIL


def test_cells_ended_before_a_process_began_are_queued_again(tmp_path):
    """What ended before, the MLflow store judged (a rerun, or changed code): run it again."""
    old = board(tmp_path)
    old.queue(["a"])
    trial_id, _ = old.take({"a"})
    old.end(trial_id, Status.FINISHED)
    later = board(tmp_path)
    assert later.settled(["a"]) == {}
    assert later.queue(["a"]) == 1


@pytest.mark.slow  # starts a process
def test_the_cell_of_a_process_that_died_is_failed_and_queued_again(tmp_path):
    live = board(tmp_path)
    live.queue(["a", "b"])
    script = textwrap.dedent(f"""
        import datetime, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from runner.board import Board
        board = Board("sqlite:///{tmp_path / 'grid.db'}", "key", datetime.datetime.now())
        print(board.take({{"a"}})[1], flush=True)
        os._exit(9)  # dies holding its cell: no end, no last heartbeat
    """)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert died.returncode == 9 and died.stdout.strip() == "a", died.stderr
    assert live.take({"a"}) is None  # it is RUNNING, held by the dead process
    dead = live.fail_dead()  # same host: its PID is gone
    assert [t.user_attrs["kmrun.cell"] for t in dead] == ["a"]
    assert live.queue(["a", "b"]) == 1
    assert live.take({"a"})[1] == "a"
