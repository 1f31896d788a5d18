"""Kills, interrupts and concurrency with real processes, real signals and real stores:
nothing finished is lost, nothing runs twice, nothing stays RUNNING."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import child_runs

pytestmark = pytest.mark.slow

SLOW_GRID = ["-m", "+experiment=forest", "params.model.n_estimators=range(200,1400,200)"]  # 6 jobs of ~1-3 s


def start(ws, args, env=None, **kwargs):
    # A shell without job control starts background commands with SIGINT ignored, and
    # nohup ignores SIGHUP; the child would inherit that. Give it the defaults, as a
    # terminal would (kmrun keeps an ignored SIGHUP ignored: nohup means stay running).
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200", **(env or {})},
                            preexec_fn=_terminal_signals,
                            **kwargs)


def _terminal_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def wait_for(ws, sql, at_least=1, timeout=120):
    """Poll the MLflow store until ``sql`` counts at least ``at_least`` rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with sqlite3.connect(ws.path / "mlflow.db") as con:
                if con.execute(sql).fetchone()[0] >= at_least:
                    return
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {sql}")


RUNNING_CHILD = ("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                 "where r.status = 'RUNNING' and t.key = 'kmrun.role' and t.value = 'child'")
FINISHED_CHILD = RUNNING_CHILD.replace("'RUNNING'", "'FINISHED'")
# a child that started moments ago: its pipeline (seconds long) is surely mid-way, so a kill
# sent now cannot land after the job ended (the race CI caught in the PostgreSQL kill tests)
JUST_STARTED_CHILD = RUNNING_CHILD + " and r.start_time > cast(strftime('%s', 'now') as integer) * 1000 - 1500"
# a run busy for a second at least: its job is past its set-up, mid-pipeline
_A_SECOND_AGO = " and r.start_time < cast(strftime('%s', 'now') as integer) * 1000 - 1000"
BUSY_CHILD = RUNNING_CHILD + _A_SECOND_AGO
BUSY_RUN = "select count(*) from runs r where r.status = 'RUNNING'" + _A_SECOND_AGO


def left_behind(ws, wait: float = 15.0) -> list[int]:
    """Processes still working in the workspace (a worker that outlived its kmrun)."""
    deadline = time.time() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == ws.path:
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.time() > deadline:
            return found
        time.sleep(0.5)


def statuses(ws):
    return Counter((r.data.tags.get("kmrun.role"), r.info.status) for r in ws.runs())


def test_kill_9_during_a_grid_then_rerun_loses_and_repeats_nothing(ws):
    proc = start(ws, SLOW_GRID)
    wait_for(ws, FINISHED_CHILD, 2)
    wait_for(ws, JUST_STARTED_CHILD, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {r.data.tags["kmrun.config_hash"] for r in ws.runs() if r.info.status == "FINISHED"}
    assert ws.running() >= 2  # the parent and the child it was running

    done = ws.kmrun(*SLOW_GRID)
    assert done.code == 0, done.text
    assert f"{len(finished_before)} skipped (already FINISHED)" in done.out
    children = child_runs(ws.runs())
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == 6 and set(finished.values()) == {1}  # every cell, once
    assert finished_before <= set(finished)  # nothing finished was redone
    assert [r.data.tags.get("kmrun.stale") for r in children if r.info.status == "FAILED"] == ["true"]
    assert ws.running() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_is_killed_promptly_and_says_how_to_resume(ws, sig):
    proc = start(ws, SLOW_GRID + ["sweep.n_jobs=2"])
    wait_for(ws, BUSY_CHILD, 1)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.time() - sent < 10, out + err
    assert proc.returncode == 130
    assert "To resume:" in err and "kmrun -m +experiment=forest" in err
    counts = statuses(ws)
    assert counts[("parent", "KILLED")] == 1 and counts[("child", "KILLED")] >= 1
    assert ws.running() == 0


def test_ctrl_c_on_a_single_run_marks_it_killed(ws):
    proc = start(ws, ["+experiment=forest", "params.model.n_estimators=3000"])
    wait_for(ws, BUSY_RUN, 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "KILLED" in err and "Traceback" not in err
    assert [r.info.status for r in ws.runs()] == ["KILLED"]


def test_a_single_run_killed_with_9_is_ended_by_the_next_single_run(ws):
    proc = start(ws, ["+experiment=forest", "params.model.n_estimators=3000"])
    wait_for(ws, "select count(*) from runs where status = 'RUNNING'", 1)
    proc.kill()
    proc.communicate(timeout=30)
    assert ws.running() == 1
    done = ws.kmrun("+experiment=baseline")
    assert done.code == 0, done.text
    assert ws.running() == 0
    stale = [r for r in ws.runs() if r.data.tags.get("kmrun.stale") == "true"]
    assert [(r.info.run_name, r.info.status) for r in stale] == [("forest", "FAILED")]


def test_a_second_signal_leaves_at_once_and_the_next_run_cleans_up(ws):
    proc = start(ws, ["+experiment=forest", "params.model.n_estimators=3000"])
    wait_for(ws, BUSY_RUN, 1)
    # Two different signals, back to back: the second reaches Python while the first is
    # still unwinding (two SIGINTs this close would merge into one in the kernel).
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, out + err
    assert "Interrupted again: exiting now" in err
    assert ws.running() == 1  # left as it was: the process did not wait to close it
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1")
    assert done.code == 0, done.text
    assert ws.running() == 0
    stale = [r for r in ws.runs() if r.data.tags.get("kmrun.stale") == "true"]
    assert [(r.info.run_name, r.info.status) for r in stale] == [("forest", "FAILED")]


def test_four_processes_on_one_study_give_exactly_n_trials(ws):
    # trials of about a second (random forests): every process starts before the work is done
    args = ["-m", "+experiment=forest", "+study=tune", "study.n_trials=12", "params.model.n_estimators=500"]
    procs = [start(ws, args) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{ws.path / 'optuna.db'}")
    states = Counter(t.state.name for t in study.trials)
    assert states["COMPLETE"] == 12 and states["RUNNING"] == 0
    assert len({t.number for t in study.trials}) == len(study.trials)
    owners = {t.user_attrs["kmrun.owner"] for t in study.trials if t.state.name == "COMPLETE"}
    assert len(owners) >= 2, owners  # the processes shared the work
    children = [r for r in ws.runs() if r.data.tags.get("kmrun.kind") == "trial"]
    complete = {t.user_attrs["mlflow_run_id"] for t in study.trials if t.state.name == "COMPLETE"}
    assert {c.info.run_id for c in children if c.info.status == "FINISHED"} == complete
    assert len(children) == 12 and ws.running() == 0


def test_a_locked_store_fails_clearly_before_the_pipeline_runs(ws):
    con = sqlite3.connect(ws.path / "mlflow.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        done = ws.kmrun("+experiment=baseline")
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert done.code == 2 and "database is locked" in done.err and "another process holds it" in done.err
    assert not (ws.path / "examples/digits/data/06_models/model.pkl").exists()  # the pipeline never ran


FOREST_GRID = ["-m", "+experiment=forest", "params.model.n_estimators=range(200,1000,200)"]  # 4 jobs of ~1-2 s


def test_two_identical_grids_started_together_run_each_cell_once(ws):
    procs = [start(ws, FOREST_GRID) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    children = child_runs(ws.runs())
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == 4 and set(finished.values()) == {1}, finished
    assert len(children) == 4 and ws.running() == 0


def test_kmrun_join_shares_a_running_grid_by_its_parent_run_id(ws):
    first = start(ws, SLOW_GRID)
    wait_for(ws, RUNNING_CHILD, 1)
    parent = next(r for r in ws.runs() if r.data.tags.get("kmrun.role") == "parent")
    joined = ws.kmrun("join", parent.info.run_id[:12])
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert joined.code == 0 and "Joining the grid of run" in joined.out, joined.text
    children = child_runs(ws.runs())
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == 6 and set(finished.values()) == {1}, finished  # each cell once
    assert len({r.data.tags["kmrun.pid"] for r in children}) == 2  # both processes ran cells
    assert ws.running() == 0
    not_parent = ws.kmrun("join", children[0].info.run_id)
    assert not_parent.code == 2 and "is not a sweep's parent run" in not_parent.err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_killed_worker_has_its_cell_run_again_and_the_sweep_goes_on(ws, sig):
    """kill -9 (the OOM killer) or SIGTERM (a container runtime) to one worker, not to kmrun."""
    proc = start(ws, SLOW_GRID + ["sweep.n_jobs=2"])
    wait_for(ws, FINISHED_CHILD, 1)
    wait_for(ws, JUST_STARTED_CHILD, 1)
    running = sorted((r for r in ws.runs() if r.info.status == "RUNNING" and r.data.tags.get("kmrun.role") == "child"),
                     key=lambda r: -r.info.start_time)  # the newest first: the one just started
    worker = int(running[0].data.tags["kmrun.pid"])
    assert worker != proc.pid  # the job's run belongs to its worker
    os.kill(worker, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err  # the lost cells ran again: nothing failed on its own
    assert "Traceback" not in err and "its worker process died" in out + err, out + err
    children = child_runs(ws.runs())
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == 6 and set(finished.values()) == {1}  # every cell, once
    lost = [r for r in children if r.info.status != "FINISHED"]
    assert running[0].info.run_id in {r.info.run_id for r in lost}
    assert {r.info.status for r in lost} <= {"FAILED", "KILLED"}  # the pool's other worker: KILLED
    assert ws.running() == 0 and left_behind(ws) == []  # no worker of the broken pool lingers
    again = ws.kmrun(*SLOW_GRID)
    assert again.code == 0 and "6 skipped" in again.text, again.text


def test_a_closed_terminal_sighup_ends_the_sweep_killed(ws):
    proc = start(ws, SLOW_GRID + ["sweep.n_jobs=2"])
    wait_for(ws, BUSY_CHILD, 1)
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    counts = statuses(ws)
    assert counts[("parent", "KILLED")] == 1 and counts[("child", "KILLED")] >= 1 and ws.running() == 0


def test_ctrl_c_in_the_first_trial_of_a_study_leaves_no_trial_running(ws):
    proc = start(ws, ["-m", "+experiment=forest", "+study=tune", "study.n_trials=2",
                      "params.model.n_estimators=3000", "params.model.C=interval(0.5,1)"])
    wait_for(ws, BUSY_CHILD, 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{ws.path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert ws.running() == 0


@pytest.mark.parametrize("group", [False, True], ids=["kmrun-alone", "terminal-group"])
def test_ctrl_c_on_a_parallel_study_ends_every_trial_and_run_of_this_process(ws, group):
    """Ctrl-C in a terminal reaches kmrun and its workers at once (the process group);
    ``kill -INT`` reaches kmrun alone. Either way: one message, exit 130 within seconds,
    each trial of this process FAIL, each run KILLED (not stale), nothing RUNNING."""
    proc = start(ws, ["-m", "+experiment=forest", "+study=tune", "study.n_trials=6", "study.n_jobs=2",
                      "params.model.n_estimators=2500", "params.model.C=interval(0.5,1)"], start_new_session=True)
    wait_for(ws, BUSY_CHILD, 2)  # two trials, each busy for a second
    sent = time.time()
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10 and proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.count("Error: Interrupted") == 1 and "To resume:" in err and "study.n_jobs=2" in err, err
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{ws.path / 'optuna.db'}")
    states = Counter(t.state.name for t in study.trials)
    assert set(states) <= {"FAIL", "COMPLETE"} and states["FAIL"] == 2, states  # both running trials ended
    trials = [r for r in ws.runs() if r.data.tags.get("kmrun.kind") == "trial"]
    killed = [r for r in trials if r.info.status == "KILLED"]
    assert len(killed) == 2 and not any(r.data.tags.get("kmrun.stale") for r in killed)
    assert {r.info.status for r in trials} <= {"KILLED", "FINISHED"}
    assert ws.running() == 0 and left_behind(ws) == []


def test_parallel_trials_record_their_own_objective(ws, monkeypatch):
    """Each trial's objective, recomputed from its own params in a fresh run, is the one
    recorded: parallel trials never read each other's files."""
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=6", "study.n_jobs=2")
    assert done.code == 0, done.text
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{ws.path / 'optuna.db'}")
    monkeypatch.chdir(ws.path)
    import runner

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    for trial in complete:
        overrides = [f"{key}={value!r}" for key, value in trial.params.items()]
        assert runner.run(["+experiment=baseline", *overrides]).objective == trial.value, trial.number


def test_ctrl_c_while_a_study_draws_its_plots_keeps_its_records_and_says_how_to_resume(ws):
    interrupted = 0
    for attempt in range(3):  # the plots may be drawn before the signal lands: then try again
        proc = start(ws, ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=2", f"study.name=plots{attempt}"])
        deadline = time.time() + 180
        while time.time() < deadline and not list(ws.path.glob("mlartifacts/*/*/artifacts/trials.csv")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        for found in ws.path.glob("mlartifacts/*/*/artifacts/trials.csv"):
            found.rename(found.with_name("seen.csv"))  # the next attempt waits for its own
        if proc.returncode == 0:
            continue
        assert proc.returncode == 130, out + err
        assert "Interrupted while drawing the study's plots" in err and f"study.name=plots{attempt}" in err, err
        assert "Traceback" not in err and ws.running() == 0
        interrupted += 1
        break
    assert interrupted == 1


def test_a_paused_process_whose_trial_another_failed_goes_on_and_counts_stay_exact(ws):
    """hostA is paused (SIGSTOP: a laptop asleep, a VM paused) mid-trial; hostB fails that
    trial as stale (no heartbeat) and completes the study; hostA wakes up and finishes."""
    args = ["-m", "+experiment=forest", "+study=tune", "study.n_trials=3", "params.model.n_estimators=2500"]
    a = start(ws, args, env={"KMRUN_HOST": "hostA"})
    wait_for(ws, BUSY_CHILD, 1)
    a.send_signal(signal.SIGSTOP)
    try:
        b = ws.kmrun(*args, env={"KMRUN_HOST": "hostB"}, timeout=400)  # waits until a's trial is stale
    finally:
        a.send_signal(signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert b.code == 0, b.text
    assert a.returncode == 0 and "was ended FAIL by another process" in out + err and "Traceback" not in err, out + err
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{ws.path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trial_runs = [r for r in ws.runs() if r.data.tags.get("kmrun.kind") == "trial"]
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert len(finished) == len(complete) >= 3  # one FINISHED run per COMPLETE trial, no more
    assert {r.info.run_id for r in finished} == {t.user_attrs["mlflow_run_id"] for t in complete}
    assert ws.running() == 0


def test_a_run_whose_pid_another_process_reuses_is_ended_by_the_next_kmrun(ws):
    """After a reboot or on a busy host a dead owner's PID may belong to a live process:
    its start time tells them apart, so the run does not look alive forever."""
    from runner.liveness import host_name

    stranger = subprocess.Popen(["sleep", "60"])  # lives, with the PID the dead owner had
    try:
        client = ws.client()
        experiment = client.create_experiment("digits")
        run = client.create_run(experiment, run_name="left-behind", tags={
            "kmrun.host": host_name(), "kmrun.pid": str(stranger.pid), "kmrun.started": "0badb007-42"})
        done = ws.kmrun("+experiment=baseline")
        assert done.code == 0, done.text
        left = client.get_run(run.info.run_id)
        assert left.info.status == "FAILED" and left.data.tags.get("kmrun.stale") == "true"
        assert ws.running() == 0
    finally:
        stranger.kill()
