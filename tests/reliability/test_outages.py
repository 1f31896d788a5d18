"""The store goes away mid-sweep and comes back (or does not): a real PostgreSQL cluster
stopped and started, a real ``mlflow server`` killed and started again on its port.

A brief outage is waited out (``store_patience``): the sweep ends as if nothing happened.
A lasting one ends the sweep with exit 2, a plain message and the resume command; the
rerun then finishes exactly (each cell once, a FINISHED run only for a COMPLETE trial)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import child_runs, free_port, mlflow_command, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import pgcluster

pytestmark = pytest.mark.slow

GRID = ["-m", "+experiment=forest", "params.model.n_estimators=range(300,1500,300)", "cache=false", "sweep.n_jobs=2"]
STUDY = ["-m", "+experiment=forest", "+study=tune", "study.n_trials=4", "study.n_jobs=2", "cache=false",
         "params.model.n_estimators=1500", "params.model.C=interval(0.5,1)"]


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg 3) is not installed")
    why = pgcluster.unavailable()
    if why:
        pytest.skip(why)
    made = pgcluster.Cluster()
    yield made
    made.stop()


def start(ws, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path, text=True,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def runs_of(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


def when_a_job_runs(uri: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until a job's run is RUNNING (mid-pipeline: the jobs take seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if any(r.info.status == "RUNNING" and r.data.tags.get("mlflow.parentRunId") for r in runs_of(uri)):
                time.sleep(1.0)
                return
        except Exception:  # the store is not created yet
            pass
        time.sleep(0.3)
    raise AssertionError("no job started")


def each_cell_once(uri: str) -> Counter:
    children = child_runs(runs_of(uri))
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == 4 and set(finished.values()) == {1}, finished
    assert not [r for r in runs_of(uri) if r.info.status == "RUNNING"]
    return finished


def test_postgresql_stopped_for_seconds_mid_grid_is_waited_out(ws, cluster):
    track = cluster.database("outage_brief")
    proc = start(ws, [*GRID, f"mlflow.tracking_uri={track}"])
    when_a_job_runs(track, proc)
    cluster.halt()
    time.sleep(8)
    cluster.start()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "stopped answering" in out and "answers again" in out and "Traceback" not in out, out[-4000:]
    each_cell_once(track)


def test_postgresql_away_longer_than_the_patience_ends_the_grid_and_the_rerun_finishes_it(ws, cluster):
    track = cluster.database("outage_long")
    args = [*GRID, f"mlflow.tracking_uri={track}", "store_patience=4"]
    proc = start(ws, args)
    when_a_job_runs(track, proc)
    cluster.halt()
    try:
        out = proc.communicate(timeout=120)[0]  # gives up while the store is still away
    finally:
        cluster.start()
    assert proc.returncode == 2, out[-4000:]
    assert "did not come back within 4 s (store_patience)" in out and "Traceback" not in out, out[-4000:]
    assert "resume:" in out and "store_patience=4" in out.split("resume:")[1], out[-2000:]
    again = start(ws, args)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-4000:]
    each_cell_once(track)


def test_a_study_on_postgresql_survives_a_restart_and_after_a_lasting_outage_its_runs_agree_with_its_trials(
        ws, cluster):
    track, storage = cluster.database("outage_study_track"), cluster.database("outage_study_optuna")
    stores = [f"mlflow.tracking_uri={track}", f"study.storage={storage}"]
    proc = start(ws, [*STUDY, *stores])
    when_a_job_runs(track, proc)
    cluster.halt()
    cluster.start()  # a restart: seconds
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]

    proc = start(ws, [*STUDY, *stores, "study.n_trials=8", "store_patience=3"])
    when_a_job_runs(track, proc)
    time.sleep(2)
    cluster.halt()
    try:
        out = proc.communicate(timeout=120)[0]
        time.sleep(25)  # the trials it left behind stop beating: the rerun finds them stale
    finally:
        cluster.start()
    assert proc.returncode == 2 and "stopped answering" in out and "Traceback" not in out, out[-4000:]
    again = start(ws, [*STUDY, *stores, "study.n_trials=8"])
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-4000:]
    study = optuna.load_study(study_name="tune", storage=storage)
    complete = {t.number for t in study.trials if t.state.name == "COMPLETE"}
    assert len(complete) == 8 and not [t for t in study.trials if t.state.name == "RUNNING"]
    trial_runs = [r for r in runs_of(track) if r.data.tags.get("kmrun.kind") == "trial"]
    finished = Counter(int(r.data.tags["optuna.trial_number"]) for r in trial_runs if r.info.status == "FINISHED")
    assert set(finished) == complete and set(finished.values()) == {1}, (finished, complete)  # runs agree with trials
    assert not [r for r in runs_of(track) if r.info.status == "RUNNING"]


class Server:
    """A real ``mlflow server`` on a fixed port over an SQLite file, to kill and start again."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_server(mlflow_command(f"sqlite:///{self.home}/server.db", self.home, self.port), self.home,
                                 f"{self.url}/health")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def test_an_mlflow_server_killed_mid_grid_and_started_again_is_waited_out(ws, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"))
    server.start()
    try:
        proc = start(ws, [*GRID, f"mlflow.tracking_uri={server.url}"])
        when_a_job_runs(server.url, proc)
        server.kill()
        back = threading.Timer(20, server.start)  # MLflow's own retries alone would wait ~4 minutes, silently
        back.start()
        sent = time.time()
        out = proc.communicate(timeout=600)[0]
        back.join()
        assert proc.returncode == 0, out[-4000:]
        assert "stopped answering" in out and "answers again" in out and "Traceback" not in out, out[-4000:]
        assert "Retrying (Retry(" not in out  # urllib3's own lines: kmrun says it waits, once
        assert time.time() - sent < 240
        each_cell_once(server.url)
    finally:
        server.kill()
