"""Sweeps on a real Ray cluster: two nodes of one CPU each on this machine (Ray's own
``cluster_utils.Cluster``), started here and stopped here. kmrun keeps the engine; the
jobs run as Ray tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import child_runs, eventually, mlflow_server

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra is not installed")

GRID = ["-m", "+experiment=forest", "params.model.n_estimators=range(300,1500,300)", "sweep.executor=ray",
        "sweep.n_jobs=2", "cache=false"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = made.add_node(num_cpus=1)
    made.wait_for_nodes()
    made.worker = worker
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray_server")
    with mlflow_server(home, f"sqlite:///{home / 'server.db'}") as url:
        yield url


def kmrun(ws, args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path, text=True,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def children(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    return child_runs(runs)


def test_a_grid_on_two_ray_nodes_runs_each_cell_once_with_the_local_results(ws, cluster, server):
    args = [*GRID, f"ray.address={cluster.address}", f"mlflow.tracking_uri={server}",
            "mlflow.experiment_name=ray-grid"]
    out = kmrun(ws, args).communicate(timeout=600)[0]
    assert "3 ran" not in out and "4 ran and finished" in out, out[-3000:]
    runs = children(server, "ray-grid")
    assert Counter(r.data.params["model.n_estimators"] for r in runs if r.info.status == "FINISHED") == {
        "300": 1, "600": 1, "900": 1, "1200": 1}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert len({r.data.tags["kmrun.ray_node"] for r in runs}) == 2  # both nodes ran jobs
    local = kmrun(ws, ["-m", "+experiment=forest", "params.model.n_estimators=300,1200", "cache=false",
                       "mlflow.experiment_name=ray-grid-local", f"mlflow.tracking_uri={server}"])
    assert local.wait(timeout=600) == 0
    here = {r.data.params["model.n_estimators"]: r.data.metrics["accuracy"] for r in children(server, "ray-grid-local")}
    there = {r.data.params["model.n_estimators"]: r.data.metrics["accuracy"] for r in runs}
    assert here == {k: there[k] for k in here}  # the same numbers as the local executor


def test_the_node_cache_on_ray_runs_a_shared_prefix_once_per_sweep_and_nothing_secret_travels(ws, cluster, server):
    """The nodes no swept key reaches run once, before the tasks go out, and every task on
    either node takes them from the cache (the nodes share this machine's disk, as a shared
    cache.dir would on a real cluster); the numbers equal a cache=false sweep. A credential,
    a secret environment variable and a URL's password reach neither the runs nor Ray's logs."""
    credential, token, password = "cred-s3cret-value-123", "env-s3cret-value-456", "pw-s3cret-789"
    (ws.path / "examples/digits/conf/local/credentials.yml").write_text(f"db:\n  con: {credential}\n")
    grid = [a for a in GRID if a != "cache=false"] + [f"ray.address={cluster.address}", f"mlflow.tracking_uri={server}",
                                                    f"+mlflow.tags.origin=postgresql://u:{password}@db.example/x"]
    cached = subprocess.run([sys.executable, "-m", "runner.cli", *grid, "mlflow.experiment_name=ray-cache"],
                            cwd=ws.path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "KMRUN_TEST_API_TOKEN": token})
    assert cached.returncode == 0 and "once for every job (node cache)" in cached.stdout, cached.stdout[-3000:]
    fresh = kmrun(ws, [*grid, "cache=false", "mlflow.experiment_name=ray-fresh"])
    assert fresh.wait(timeout=600) == 0
    runs = children(server, "ray-cache")
    hits = {r.data.tags["kmrun.cache.hits"] for r in runs}
    assert len(runs) == 4 and len(hits) == 1 and hits != {"none"}, hits  # the same prefix, from the cache, everywhere
    assert len({r.data.tags["kmrun.ray_node"] for r in runs}) == 2
    metrics = {r.data.params["model.n_estimators"]: r.data.metrics for r in runs}
    assert metrics == {r.data.params["model.n_estimators"]: r.data.metrics for r in children(server, "ray-fresh")}
    recorded = repr([(r.data.tags, r.data.params) for r in runs])
    session = Path(cluster.head_node.get_session_dir_path())
    logs = "".join(f.read_text(errors="replace") for f in session.rglob("*") if f.is_file() and f.suffix in (
        ".log", ".out", ".err", ".txt", ".json"))
    for secret in (credential, token, password):
        assert secret not in recorded and secret not in logs and secret not in cached.stdout + cached.stderr, secret


def test_a_node_removed_mid_grid_has_its_job_run_again_elsewhere(ws, tmp_path, server):
    from ray.cluster_utils import Cluster

    own = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    doomed = own.add_node(num_cpus=1)
    own.wait_for_nodes()
    try:
        proc = kmrun(ws, [*GRID, f"ray.address={own.address}", f"mlflow.tracking_uri={server}",
                          "mlflow.experiment_name=ray-node-lost", "params.model.n_estimators=range(1500,2700,300)"])
        wait_running(server, "ray-node-lost", 1, node=doomed.node_id[:12])
        own.remove_node(doomed, allow_graceful=False)  # its raylet and workers die: a node lost mid-job
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-4000:]
        assert "runs again" in out and "Traceback" not in out, out[-4000:]
        runs = children(server, "ray-node-lost")
        finished = Counter(r.data.params["model.n_estimators"] for r in runs if r.info.status == "FINISHED")
        assert finished == {"1500": 1, "1800": 1, "2100": 1, "2400": 1}, finished
        assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"} and len(runs) == 5
    finally:
        own.shutdown()


def test_a_store_in_a_file_is_refused_on_a_cluster_of_several_nodes_before_any_run(ws, cluster):
    out = kmrun(ws, [*GRID, f"ray.address={cluster.address}"])
    text = out.communicate(timeout=300)[0]
    assert out.returncode == 2, text[-3000:]
    assert "mlflow.tracking_uri is a file on this machine" in text and "other 1 nodes" in text, text[-3000:]
    assert "Traceback" not in text and ws.running() == 0 and not ws.runs()


def test_an_unreachable_cluster_exits_2_before_any_run(ws):
    sent = time.time()
    out = kmrun(ws, [*GRID, "ray.address=127.0.0.1:1"])
    text = out.communicate(timeout=300)[0]
    assert out.returncode == 2 and "cannot join the Ray cluster at '127.0.0.1:1'" in text, text[-3000:]
    assert "Traceback" not in text and not ws.runs() and time.time() - sent < 120


def wait_running(server: str, experiment: str, count: int, node: str | None = None, busy: float = 1.0,
                 timeout: float = 300) -> None:
    """Poll until ``count`` jobs (on ``node``, if given) have been running on Ray for ``busy`` seconds."""
    from mlflow import MlflowClient

    client = MlflowClient(server)

    def running() -> bool:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
        since = (time.time() - busy) * 1000
        busy_here = [r for r in runs if r.info.start_time < since and "kmrun.ray_node" in r.data.tags
                     and node in (None, r.data.tags["kmrun.ray_node"])]
        return len(busy_here) >= count

    assert eventually(running, timeout), f"no {count} jobs running on Ray"


def test_ctrl_c_on_a_ray_sweep_cancels_its_tasks_ends_runs_killed_and_the_command_resumes(ws, cluster, server):
    args = [*GRID, f"ray.address={cluster.address}", f"mlflow.tracking_uri={server}",
            "mlflow.experiment_name=ray-interrupt", "params.model.n_estimators=range(1500,2700,300)"]
    proc = kmrun(ws, args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_running(server, "ray-interrupt", 2)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and time.time() - sent < 30, out[-3000:]
    assert "To resume:" in out and "Traceback" not in out, out[-3000:]
    killed = [r for r in children(server, "ray-interrupt") if r.info.status == "KILLED"]
    assert len(killed) == 2, [(r.info.status) for r in children(server, "ray-interrupt")]
    again = kmrun(ws, args)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0, text[-3000:]
    finished = Counter(r.data.params["model.n_estimators"] for r in children(server, "ray-interrupt")
                       if r.info.status == "FINISHED")
    assert finished == {"1500": 1, "1800": 1, "2100": 1, "2400": 1}, finished


def test_a_study_on_two_ray_nodes_holds_exactly_n_trials(ws, cluster, server):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import pgcluster

    if pgcluster.unavailable():
        pytest.skip(pgcluster.unavailable())
    pytest.importorskip("psycopg")
    import optuna

    database = pgcluster.Cluster()
    try:
        storage = database.database("ray_study")
        out = kmrun(ws, ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=6", "study.n_jobs=2",
                         "sweep.executor=ray", f"ray.address={cluster.address}", f"mlflow.tracking_uri={server}",
                         f"study.storage={storage}", "mlflow.experiment_name=ray-study"]).communicate(timeout=900)[0]
        study = optuna.load_study(study_name="tune", storage=storage)
        states = Counter(t.state.name for t in study.trials)
        assert states == {"COMPLETE": 6}, (states, out[-3000:])
        runs = [r for r in children(server, "ray-study") if r.data.tags.get("kmrun.kind") == "trial"]
        assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if r.info.status == "FINISHED") == list(range(6))
        assert len({r.data.tags["kmrun.ray_node"] for r in runs}) == 2
        assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    finally:
        database.stop()


def test_a_jobs_python_exception_on_ray_is_its_own_clear_message_and_the_run_ends_failed(ws, cluster, server):
    """A pipeline that raises on a Ray node: the job's own error (not a Ray wrapper, not a
    lost worker), its run FAILED with the traceback, the other cell FINISHED, exit 1."""
    done = subprocess.run([sys.executable, "-m", "runner.cli", "-m", "+experiment=baseline", "params.model.C=1,-1",
                           "sweep.executor=ray", "sweep.n_jobs=2", "cache=false", f"ray.address={cluster.address}",
                           f"mlflow.tracking_uri={server}", "mlflow.experiment_name=ray-raises"],
                          cwd=ws.path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"})
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-3000:]
    assert "The pipeline raised InvalidParameterError" in text and "RayTaskError" not in text, text[-3000:]
    assert "died" not in text and "lost" not in text.lower()  # not taken for a lost worker, nor run again
    runs = {r.data.params["model.C"]: r.info.status for r in children(server, "ray-raises")}
    assert runs == {"1.0": "FINISHED", "-1.0": "FAILED"}  # C coerced to the parameter's float


def test_a_project_shipped_by_ray_runs_from_its_package_which_holds_no_secret(ws, cluster, server):
    """``ray.runtime_env.working_dir``: the driver packs the project once; each task runs the
    copy Ray unpacked on its node (the run records the package), and the package holds
    neither a file of ``conf/local`` nor a credentials file."""
    credential = "cred-s3cret-shipped-123"
    (ws.path / "examples/digits/conf/local/credentials.yml").write_text(f"db:\n  con: {credential}\n")
    done = subprocess.run([sys.executable, "-m", "runner.cli", "-m", "+experiment=baseline", "params.model.C=0.5,2",
                           "sweep.executor=ray", "sweep.n_jobs=2", "cache=false", f"ray.address={cluster.address}",
                           f"mlflow.tracking_uri={server}", "mlflow.experiment_name=ray-shipped",
                           "ray.runtime_env.working_dir=examples/digits"],
                          cwd=ws.path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = children(server, "ray-shipped")
    assert sorted(r.data.params["model.C"] for r in runs if r.info.status == "FINISHED") == ["0.5", "2.0"]
    packages = {r.data.tags.get("kmrun.ray_package", "") for r in runs}
    assert len(packages) == 1 and packages.pop().startswith("gcs://_ray_pkg_"), packages
    unpacked = [p for p in Path(cluster.head_node.get_session_dir_path()).glob(
        "runtime_resources/working_dir_files/_ray_pkg_*") if (p / "conf/base/parameters.yml").is_file()]
    assert unpacked, "Ray unpacked no copy of the project"
    for copy in unpacked:
        assert (copy / "src/digits/pipelines/train/nodes.py").is_file()
        assert not [f for f in (copy / "conf/local").rglob("*") if f.is_file()]  # an empty folder, made on the node
        assert not [f for f in copy.rglob("*") if f.is_file() and credential in f.read_text(errors="replace")]


HOG = '''

def _hog(gigabytes: float) -> None:
    """Takes memory a quarter of a gigabyte at a time (a test's out-of-memory job)."""
    import time

    held = []
    for _ in range(int(gigabytes * 4)):
        held.append(np.ones(2**25))  # 256 MiB, touched
        time.sleep(0.05)
    time.sleep(30)
'''


def test_a_job_out_of_memory_on_ray_says_so_and_how_to_fix_it(ws, server):
    """Ray's memory monitor kills a job that takes more memory than the node has to spare
    (its threshold set 2 GB above what this machine uses now): the message says it ran out
    of memory and names ray.resources.memory; it runs again once (as for any lost worker),
    and both its runs end FAILED."""
    from ray.cluster_utils import Cluster

    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace('    kind = model["type"]\n',
                                               '    kind = model["type"]\n    _hog(model.get("hog_gb", 0))\n', 1) + HOG)
    parameters = ws.path / "examples/digits/conf/base/parameters.yml"
    parameters.write_text(parameters.read_text().replace("model:\n", "model:\n  hog_gb: 0\n", 1))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total, available = (int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
    threshold = (total - available + 2 * 2**30) / total
    own = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "_system_config": {"memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 100}})
    try:
        done = subprocess.run([sys.executable, "-m", "runner.cli", "-m", "+experiment=baseline",
                               "params.model.hog_gb=6,0", "sweep.executor=ray", "cache=false",
                               f"ray.address={own.address}", f"mlflow.tracking_uri={server}",
                               "mlflow.experiment_name=ray-oom"],
                              cwd=ws.path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"})
    finally:
        own.shutdown()
    text = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in text, text[-3000:]
    assert "out of memory" in text and "ray.resources.memory" in text, text[-3000:]
    statuses = Counter((r.info.run_name, r.info.status) for r in children(server, "ray-oom"))
    assert statuses == {("hog_gb=0", "FINISHED"): 1, ("hog_gb=6", "FAILED"): 2}, statuses  # run again once


RAY_EDITS = ("class named by a param, load_obj", "module imported in a node's body", "package folder named data",
             "file a node reads by path", "singledispatch implementation", "attribute a decorator sets")


def test_the_node_cache_on_ray_gives_a_plain_runs_numbers_after_edits(tmp_path, template_store, libraries, cluster,
                                                                       server):
    """A subset of the difference test (tests/test_cache_mutations.py) on two Ray nodes: after
    each edit, a cached grid on the cluster records what a cache=false grid run here records."""
    from kedro_projects import project
    from mutation_project import CATALOG, EDITS, FILES, KMRUN, PARAMETERS, PIPELINE
    from test_cache_mutations import apply
    from test_cache_mutations import kmrun as run

    root = tmp_path / "ws"
    where = project(root, "mutp", PIPELINE, {**FILES, "conf/base/parameters.yml": PARAMETERS}, {}, CATALOG, KMRUN,
                    template_store)
    grid = ("-m", "params.model.alpha=0.1,0.2", "sweep.executor=ray", "sweep.n_jobs=2", f"ray.address={cluster.address}",
            f"mlflow.tracking_uri={server}")
    env: dict[str, str] = {}
    run(root, env, *grid, daemon=False, uri=server)
    edits = {edit[0]: edit for edit in EDITS}
    for what in RAY_EDITS:
        apply(where, edits[what], libraries, env)
        cached = run(root, env, *grid, daemon=False, uri=server)
        fresh = run(root, env, *grid[:2], "cache=false", f"mlflow.tracking_uri={server}", daemon=False, uri=server)
        assert cached["metrics"] == fresh["metrics"], what
        assert edits[what][5] <= cached["ran"], (what, cached["ran"])
