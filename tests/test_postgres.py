"""Many processes and "hosts" on PostgreSQL: a real server, started here and stopped here.

A host is a separate working copy whose kmrun runs in Linux namespaces of its own
(``unshare``, as root): its own host name (UTS), its own process ids (PID), and, where
both stores are PostgreSQL, its own network, reaching the database only through the
server's Unix socket. So no host can see another's processes: a dead host's work must
be found through Optuna's heartbeats (studies, and grids with ``sweep.storage``) or
PostgreSQL's advisory locks (grids on a PostgreSQL tracking store). Hosts that talk to
an MLflow server share the loopback network. Where namespaces cannot be made, a host is
a separate ``KMRUN_HOST`` identity instead (``namespaces()`` says which).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_runs, make_workspace, mlflow_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pgcluster

pytestmark = pytest.mark.slow
NAMESPACES = ["unshare", "--uts", "--pid", "--fork", "--mount-proc"]


class Databases:
    """``postgres(name)`` makes a database and returns its URL on 127.0.0.1."""

    def __init__(self, cluster: pgcluster.Cluster) -> None:
        self.cluster = cluster

    def __call__(self, name: str) -> str:
        return self.cluster.database(name)

    def through_socket(self, argument: str) -> str:
        """An override holding a URL of this cluster, with the URL through its socket."""
        if f"@127.0.0.1:{self.cluster.port}/" not in argument:
            return argument
        key, _, url = argument.partition("=")
        return f"{key}='{self.cluster.through_socket(url)}'"  # quoted: the URL's query holds '='


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temp dir, on 127.0.0.1 and a Unix socket, with trust
    auth; stopped at the end."""
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg 3) is not installed")
    why = pgcluster.unavailable()
    if why:
        pytest.skip(why)
    cluster = pgcluster.Cluster()
    yield Databases(cluster)
    cluster.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    """A real ``mlflow server`` whose backend is a PostgreSQL database, artifacts proxied."""
    with mlflow_server(tmp_path_factory.mktemp("pg_server"), postgres("server_store")) as url:
        yield url


@functools.cache
def namespaces() -> bool:
    """Whether this machine lets the tests give a host namespaces of its own."""
    probe = [*NAMESPACES, "--net", "sh", "-c", "hostname probe && test $$ = 1"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def host(tmp_path_factory, template_store, name: str):
    """A working copy of its own: one simulated host."""
    return make_workspace(tmp_path_factory.mktemp(name), template_store)


def launch(ws, args: list[str], host_name: str, own_network: Databases | None = None,
           **kwargs) -> subprocess.Popen:
    """kmrun in that working copy, as that host: in its own namespaces (``own_network``:
    its own network too, reaching those databases through their socket)."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    env.pop("KMRUN_HOST", None)
    command = [sys.executable, "-m", "runner.cli", *args]
    if not namespaces():
        env["KMRUN_HOST"] = host_name
    elif own_network is not None:
        command = [*NAMESPACES, "--net", "sh", "-c", 'hostname "$0" && exec "$@"', host_name,
                   *command[:3], *(own_network.through_socket(a) for a in args)]
    else:
        command = [*NAMESPACES, "sh", "-c", 'hostname "$0" && exec "$@"', host_name, *command]
    return subprocess.Popen(command, cwd=ws.path, env=env, **kwargs)


def run_host(ws, args: list[str], host_name: str, own_network: Databases | None = None, timeout: float = 600):
    """kmrun as that host, to its end: (exit code, output)."""
    proc = launch(ws, args, host_name, own_network, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.communicate(timeout=timeout)[0]
    return proc.returncode, output


def outer_pid(session: int, local: int) -> int:
    """The process id, as seen here, of the process ``local`` inside a host's PID
    namespace (of the host started with ``start_new_session``: ``session``)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("NSpid:"))
            pids = [int(x) for x in line.split()[1:]]
            if pids[-1] == local and os.getsid(pids[0]) == session:
                return pids[0]
        except (OSError, StopIteration, ValueError):
            continue
    raise LookupError(f"no process {local} in session {session}")


def just_started(run, seconds: float = 1.5) -> bool:
    """A RUNNING job's run that began moments ago: its pipeline (seconds long) is surely
    mid-way, so a kill now cannot land after it ended."""
    return run.info.status == "RUNNING" and time.time() * 1000 - run.info.start_time < seconds * 1000


def kill_host_when(ws, args: list[str], ready, what: str, own_network: Databases | None = None) -> None:
    """Start kmrun as host "a", wait until ``ready()`` is true, then kill -9 its whole
    process tree (the host dies mid-job)."""
    log = ws.path / "host_a.log"
    with open(log, "w") as out:
        victim = launch(ws, args, "a", own_network, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while True:
        assert time.time() < deadline and victim.poll() is None, (
            f"host a never had {what} running (exit {victim.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
        try:
            if ready():
                break
        except Exception:  # the store or the study is not created yet
            continue
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()


def optuna_study(storage: str, name: str = "tune"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def trial_runs(uri: str, experiment: str | None = None) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments() if experiment in (None, e.name)]
    return client.search_runs(ids, max_results=1000)


def test_a_study_with_two_workers_on_postgresql_five_times_in_a_row(ws, postgres):
    track, storage = postgres("track_twice"), postgres("optuna_twice")
    for i in range(1, 6):
        done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", f"study.n_trials={2 * i}", "study.n_jobs=2",
                        f"study.storage={storage}", f"mlflow.tracking_uri={track}", timeout=300)
        assert done.code == 0, (i, done.text[-3000:])
    import optuna

    states = [t.state for t in optuna_study(storage).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 10 and len(states) == 10
    runs = trial_runs(track)
    children = [r for r in runs if r.data.tags.get("kmrun.kind") == "trial"]
    assert len(children) == 10 and all(r.info.status == "FINISHED" for r in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_four_hosts_start_at_once_on_empty_databases_and_share_one_study(tmp_path_factory, template_store, postgres):
    track, storage = postgres("track_four"), postgres("optuna_four")
    args = ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=16", f"study.storage={storage}",
            f"mlflow.tracking_uri={track}"]
    hosts = [host(tmp_path_factory, template_store, f"host{i}") for i in range(4)]
    procs = [launch(h, args, f"host{i}", postgres, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i, h in enumerate(hosts)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n---\n".join(o[-2000:] for o in outputs)
    import optuna

    trials = optuna_study(storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 16 and len({t.number for t in trials}) == len(trials)
    runs = trial_runs(track)
    finished = {r.info.run_id for r in runs if r.data.tags.get("kmrun.kind") == "trial" and r.info.status == "FINISHED"}
    assert finished == {t.user_attrs["mlflow_run_id"] for t in complete}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert len([r for r in runs if r.data.tags.get("kmrun.role") == "parent"]) == 4


def test_a_host_killed_mid_trial_is_failed_by_heartbeat_and_leaves_nothing_running(
        tmp_path_factory, template_store, postgres):
    import optuna

    track, storage = postgres("track_kill"), postgres("optuna_kill")
    # 8 trials, each computing every node (cache=false): the watcher polls two stores, and needs a
    # trial caught while its pipeline runs (the node cache made trials short enough to miss)
    args = ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=8", f"study.storage={storage}",
            f"mlflow.tracking_uri={track}", "params.model.max_iter=5000", "params.model.C=tag(log, interval(100, 1000))",
            "cache=false"]
    a, b = host(tmp_path_factory, template_store, "host_a"), host(tmp_path_factory, template_store, "host_b")

    from mlflow import MlflowClient

    chosen: list = []

    def running_trial() -> bool:  # a trial mid-pipeline: its MLflow run, too, is still RUNNING
        if not any(r.info.status == "RUNNING" for r in trial_runs(track)):
            return False  # opening the storage before host a has made it would race a's schema creation
        chosen[:] = [t for t in optuna_study(storage).trials
                     if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                     and just_started(MlflowClient(track).get_run(t.user_attrs["mlflow_run_id"]))]
        return bool(chosen)

    kill_host_when(a, args, running_trial, "a trial", postgres)  # the whole host: kmrun and its workers
    dead = chosen[0]  # the trial whose run had just started when the kill landed

    code, output = run_host(b, args, "b", postgres)  # host b cannot see a's processes
    assert code == 0, output[-3000:]
    trials = optuna_study(storage).trials
    assert [t.state for t in trials].count(optuna.trial.TrialState.COMPLETE) == 8
    assert next(t for t in trials if t.number == dead.number).state == optuna.trial.TrialState.FAIL
    runs = trial_runs(track)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # a's trial run and a's parent too
    orphan = next(r for r in runs if r.info.run_id == dead.user_attrs["mlflow_run_id"])
    assert orphan.info.status == "FAILED" and orphan.data.tags.get("kmrun.stale") == "true"


def test_two_hosts_with_two_workers_share_one_grid_each_cell_once(tmp_path_factory, template_store, postgres):
    track = postgres("track_grid")
    values = ",".join(str(round(0.05 * 1.5**i, 5)) for i in range(12))
    args = ["-m", "+experiment=baseline", f"params.model.C={values}", "sweep.n_jobs=2", f"mlflow.tracking_uri={track}"]
    hosts = [host(tmp_path_factory, template_store, f"grid{i}") for i in range(2)]
    procs = [launch(h, args, f"grid{i}", postgres, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i, h in enumerate(hosts)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outputs)
    runs = trial_runs(track)
    children = child_runs(runs)
    shown = [(r.data.params.get("model.C"), r.info.status, r.data.tags.get("kmrun.host"), r.data.tags.get("kmrun.stale"))
             for r in children]
    assert len(children) == 12 and all(r.info.status == "FINISHED" for r in children), (shown, outputs)
    assert len({r.data.params["model.C"] for r in children}) == 12  # each cell exactly once
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_host_killed_mid_cell_has_its_cell_run_again_by_the_other(tmp_path_factory, template_store, postgres):
    track = postgres("track_grid_kill")
    values = ",".join(str(1500 + 300 * i) for i in range(4))  # forests of seconds: the kill lands mid-job
    args = ["-m", "+experiment=forest", f"params.model.n_estimators={values}", "cache=false",
            f"mlflow.tracking_uri={track}"]
    a, b = host(tmp_path_factory, template_store, "cells_a"), host(tmp_path_factory, template_store, "cells_b")
    running: list = []

    def running_cell() -> bool:
        running[:] = [r for r in trial_runs(track) if r.data.tags.get("kmrun.role") == "child"
                      and just_started(r)]
        return bool(running)

    kill_host_when(a, args, running_cell, "a cell", postgres)  # the whole host, mid-cell

    code, output = run_host(b, args, "b", postgres)  # b cannot see a's processes
    assert code == 0, output[-3000:]
    runs = trial_runs(track)
    children = child_runs(runs)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.params["model.n_estimators"]) for r in finished) == [1500, 1800, 2100, 2400]  # once each
    orphan = next(r for r in children if r.info.run_id == running[0].info.run_id)
    assert orphan.info.status == "FAILED" and orphan.data.tags.get("kmrun.stale") == "true"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_shared_store_whose_artifacts_stay_on_this_disk_is_warned_about(ws, postgres):
    track = postgres("track_warn")
    done = ws.kmrun("+experiment=baseline", f"mlflow.tracking_uri={track}", env={"COLUMNS": "1000"})
    assert done.code == 0, done.text
    assert "is shared, but this experiment's artifacts go to" in done.text
    assert "other machines cannot read them" in done.text and str(ws.path) in done.text


def board_trials(storage: str) -> list:
    import optuna

    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).trials


def test_two_hosts_share_a_grid_on_an_mlflow_server_through_an_optuna_storage(
        tmp_path_factory, template_store, postgres, server):
    board = postgres("board_grid")
    values = ",".join(str(round(0.05 * 1.5**i, 5)) for i in range(12))
    args = ["-m", "+experiment=baseline", f"params.model.C={values}", "sweep.n_jobs=2", f"sweep.storage={board}",
            f"mlflow.tracking_uri={server}", "mlflow.experiment_name=board-grid"]
    hosts = [host(tmp_path_factory, template_store, f"board{i}") for i in range(2)]
    procs = [launch(h, args, f"board{i}", text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i, h in enumerate(hosts)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outputs)
    runs = trial_runs(server, "board-grid")
    children = child_runs(runs)
    shown = [(r.data.params.get("model.C"), r.info.status, r.data.tags.get("kmrun.host"), r.data.tags.get("kmrun.stale"))
             for r in children]
    assert len(children) == 12 and all(r.info.status == "FINISHED" for r in children), (shown, outputs)
    assert len({r.data.params["model.C"] for r in children}) == 12  # each cell exactly once
    assert {r.data.tags["kmrun.host"] for r in children} == {"board0", "board1"}  # both hosts worked
    trials = board_trials(board)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 12
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_host_killed_mid_cell_has_its_cell_run_again_through_the_optuna_storage(
        tmp_path_factory, template_store, postgres, server):
    board = postgres("board_kill")
    # forests of seconds each: a logistic regression can end within the just_started window,
    # and a kill that lands after its job finished leaves nothing to run again
    values = ",".join(str(1500 + 300 * i) for i in range(4))
    args = ["-m", "+experiment=forest", f"params.model.n_estimators={values}", "cache=false",
            f"sweep.storage={board}", f"mlflow.tracking_uri={server}", "mlflow.experiment_name=board-kill"]
    a, b = host(tmp_path_factory, template_store, "board_a"), host(tmp_path_factory, template_store, "board_b")

    from mlflow import MlflowClient

    chosen: list = []

    def running_cell() -> bool:  # a cell mid-pipeline on host a: its trial RUNNING, its run just started
        if not any(r.data.tags.get("kmrun.role") == "child" and just_started(r)
                   for r in trial_runs(server, "board-kill")):
            return False  # opening the storage before host a has made it would race a's schema creation
        chosen[:] = [t for t in board_trials(board) if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs
                     and just_started(MlflowClient(server).get_run(t.user_attrs["mlflow_run_id"]))]
        return bool(chosen)

    kill_host_when(a, args, running_cell, "a cell")  # the whole host: kmrun and its workers
    dead = chosen[0]

    code, output = run_host(b, args, "b")  # b learns of a's death by heartbeat only
    assert code == 0, output[-3000:]
    runs = trial_runs(server, "board-kill")
    children = child_runs(runs)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(int(r.data.params["model.n_estimators"]) for r in finished) == [1500, 1800, 2100, 2400]  # once each
    orphan = next(r for r in children if r.info.run_id == dead.user_attrs["mlflow_run_id"])
    assert orphan.info.status == "FAILED" and orphan.data.tags.get("kmrun.stale") == "true"
    trials = board_trials(board)
    again = [t for t in trials if t.user_attrs["kmrun.cell"] == dead.user_attrs["kmrun.cell"]]
    assert [t.state.name for t in again] == ["FAIL", "COMPLETE"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_two_hosts_share_a_grid_and_a_killed_worker_has_its_cell_run_again(
        tmp_path_factory, template_store, postgres):
    track, board = postgres("track_worker"), postgres("board_worker")
    values = ",".join(str(100 + 25 * i) for i in range(12))
    args = ["-m", "+experiment=baseline", f"params.model.C={values}", "params.model.max_iter=3000", "sweep.n_jobs=2",
            f"sweep.storage={board}", f"mlflow.tracking_uri={track}"]
    hosts = [host(tmp_path_factory, template_store, f"worker{i}") for i in range(2)]
    procs = [launch(h, args, f"worker{i}", postgres, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True) for i, h in enumerate(hosts)]
    main = 1 if namespaces() else procs[0].pid  # kmrun's own process id on host worker0
    deadline = time.time() + 300
    while True:  # a cell mid-pipeline in one of host worker0's worker processes
        assert time.time() < deadline and procs[0].poll() is None, "host worker0 never ran a cell in a worker"
        running = [r for r in trial_runs(track) if r.data.tags.get("kmrun.role") == "child"
                   and r.info.status == "RUNNING" and r.data.tags.get("kmrun.host") == "worker0"
                   and r.data.tags.get("kmrun.pid") != str(main)]
        if running:
            break
        time.sleep(0.3)
    os.kill(outer_pid(procs[0].pid, int(running[0].data.tags["kmrun.pid"])), signal.SIGKILL)  # a worker, not its host
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-2000:] for o in outputs)
    assert "its worker process died" in outputs[0]
    runs = trial_runs(track)
    children = child_runs(runs)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(float(r.data.params["model.C"]) for r in finished) == [100 + 25 * i for i in range(12)]
    lost = next(r for r in children if r.info.run_id == running[0].info.run_id)
    assert lost.info.status == "FAILED"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_password_in_sweep_storage_is_in_no_record_file_or_output(ws, postgres):
    board = postgres("board_secret").replace("postgres@", "postgres:planted-pw-4711@")  # trust auth ignores it
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1", f"sweep.storage={board}")
    assert done.code == 0, done.text
    assert "planted-pw-4711" not in done.text
    client = ws.client()
    for run in ws.runs():
        assert "planted-pw-4711" not in str(run.data.params) + str(run.data.tags)
        for item in client.list_artifacts(run.info.run_id):
            if not item.is_dir:
                local = client.download_artifacts(run.info.run_id, item.path, str(ws.path / "downloads"))
                assert "planted-pw-4711" not in open(local, errors="replace").read(), item.path
    leaks = [p for p in ws.path.rglob("*") if p.is_file() and b"planted-pw-4711" in p.read_bytes()]
    assert leaks == []
