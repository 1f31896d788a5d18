"""kmrun's benchmark: per-trial overhead, parallel throughput and start-up.

    python bench/run.py            # the full run (about 7 minutes here)
    python bench/run.py --quick    # under 4 minutes
    python bench/run.py --tiny     # a smoke run for the test suite; its figures mean nothing

Every figure is a ratio or a time measured within this one run, on this machine. The
per-trial contenders run in interleaved rounds so that drift on a shared machine hits
them alike. The table is printed and written to bench/results/latest.json (or --out).

Contenders, on the same trials (logistic regression on the digits, C varied):
  (a) hand loop: the example's node functions called in a loop, one MLflow run per trial
      (params and metrics through MlflowClient.log_batch), in one process.
  (b) kmrun: a grid of the same trials (`kmrun -m`), and a study of them (grid sampler).
      Per-trial cost is marginal: (T(k + n) - T(k)) / n over fresh stores, so the fixed
      start-up (imports, Hydra, bootstrapping Kedro) cancels out; it is measured apart,
      as the time to the first trial.
  (c) naive: `kedro run --params` as a subprocess per trial, logging through kedro-mlflow
      when it is installed (the dev extra installs it; without it, a lower bound).
  (d) the node cache, on the example's `features` pipeline (a kernel-PCA embedding that
      costs far more than the model fitted on it): a kmrun study with the cache (the
      default) and with `cache=false`, against a hand loop of the same nodes. (b) runs
      with `cache=false` so that it measures kmrun's own overhead on equal work.
      The time to compute the node keys of the example's pipeline is measured apart: for
      a process's first job (it walks the code the nodes reach) and for each job after it.
  (e) many machines' stores (when PostgreSQL's server can be started here): the parallel
      grid of (b)'s throughput figure with PostgreSQL as the tracking store, and the
      per-trial cost of a grid against `mlflow server` on PostgreSQL over the SQLite file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200", "KMRUN_DAEMON": "0"}
ENV.pop("MLFLOW_TRACKING_URI", None)

SIZES = {  # trials per contender, rounds, naive trials, jobs per parallel sweep, runs in the query stores
    "full": {"trials": 30, "rounds": 2, "naive": 3, "parallel_jobs": 16, "store_runs": 500, "big_store": 3000,
             "check_cells": 10_000, "dry_run_cells": 100_000},
    "quick": {"trials": 12, "rounds": 1, "naive": 2, "parallel_jobs": 8, "store_runs": 500, "big_store": 1000,
              "check_cells": 2_000, "dry_run_cells": 20_000},
    "tiny": {"trials": 1, "rounds": 1, "naive": 1, "parallel_jobs": 2, "store_runs": 20, "big_store": 60,
             "check_cells": 50, "dry_run_cells": 200},
}
SMALL_STORE = 50  # runs in the store `kmrun show` is compared against
C_VALUES = [round(0.01 * 1.2**i, 6) for i in range(80)]  # distinct values: no cell is ever skipped
BASE_TRIALS = 2  # the small run of the marginal-cost pair (a grid needs at least two cells)


def workspace(base: Path, template: Path) -> Path:
    """A fresh copy of conf/ and the example, with an empty migrated MLflow store."""
    path = Path(tempfile.mkdtemp(dir=base))
    shutil.copytree(ROOT / "conf", path / "conf")
    shutil.copytree(ROOT / "examples" / "digits", path / "examples" / "digits",
                    ignore=shutil.ignore_patterns("*.pkl", "*.json", "sessions", "__pycache__"))
    shutil.copy(template, path / "mlflow.db")
    return path


def timed(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def kmrun(cwd: Path, *args: str) -> float:
    return timed([sys.executable, "-m", "runner.cli", *args], cwd)


def values(n: int, offset: int = 0) -> str:
    return ",".join(str(c) for c in C_VALUES[offset : offset + n])


def kmrun_grid(ws: Path, n: int) -> float:
    return kmrun(ws, "-m", "+experiment=baseline", f"params.model.C={values(n)}", "cache=false")


def kmrun_study(ws: Path, n: int, *extra: str) -> float:
    return kmrun(ws, "-m", "+experiment=baseline", "+study=tune", f"study.n_trials={n}",
                 "study.sampler.name=grid", "~study.search_space", f"params.model.C=choice({values(n)})",
                 *(extra or ("cache=false",)))


def hand_loop(uri: str, n: int, features: bool = False) -> float:
    """Contender (a), in this process: seconds for ``n`` trials (with ``features``, on the
    `features` pipeline's nodes: the embedding is computed in every trial)."""
    sys.path.insert(0, str(ROOT / "examples" / "digits" / "src"))
    from digits.pipelines.features.nodes import embed
    from digits.pipelines.train import nodes
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from runner.redact import flatten

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"hand-{time.time_ns()}")
    base = {"split": {"test_size": 0.25, "seed": 42},
            "model": {"type": "logistic_regression", "C": 1.0, "max_iter": 300, "n_estimators": 100,
                      "max_depth": 12, "alpha": 0.0001, "epochs": 20, "seed": 0}}
    start = time.perf_counter()
    for C in C_VALUES[:n]:
        params = {**base, "model": {**base["model"], "C": C}}
        run = client.create_run(experiment)
        data = nodes.load_digits()
        if features:
            data = embed(data, {"n_components": 40, "gamma": 0.05})
        X_train, X_test, y_train, y_test = nodes.split_data(data, params["split"])
        model, _ = nodes.train_model(X_train, y_train, X_test, y_test, params["model"])
        metrics = nodes.evaluate_model(model, X_test, y_test)
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flatten(params).items()],
                         metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
    return time.perf_counter() - start


def per_trial(base: Path, template: Path, n: int, rounds: int) -> dict[str, float]:
    """Seconds per trial for (a) and (b), in interleaved rounds; the median round counts."""
    hand, grid, study = [], [], []
    for _ in range(rounds):
        hand_ws = workspace(base, template)
        hand.append(hand_loop(f"sqlite:///{hand_ws / 'mlflow.db'}", n) / n)
        small, large = kmrun_grid(workspace(base, template), BASE_TRIALS), kmrun_grid(workspace(base, template), BASE_TRIALS + n)
        grid.append((large - small) / n)
        small, large = kmrun_study(workspace(base, template), BASE_TRIALS), kmrun_study(workspace(base, template), BASE_TRIALS + n)
        study.append((large - small) / n)
    return {"hand": statistics.median(hand), "grid": statistics.median(grid), "study": statistics.median(study)}


def cached(base: Path, template: Path, n: int, rounds: int) -> dict[str, float]:
    """Contender (d): seconds per trial on the `features` pipeline, by hand and by a kmrun
    study with and without the node cache (marginal, as for (b))."""
    hand, warm, cold = [], [], []
    features = "kedro.pipeline=features"
    for _ in range(rounds):
        hand_ws = workspace(base, template)
        hand.append(hand_loop(f"sqlite:///{hand_ws / 'mlflow.db'}", n, features=True) / n)
        for results, cache in ((warm, "cache=true"), (cold, "cache=false")):
            small = kmrun_study(workspace(base, template), BASE_TRIALS, features, cache)
            large = kmrun_study(workspace(base, template), BASE_TRIALS + n, features, cache)
            results.append((large - small) / n)
    return {"hand": statistics.median(hand), "cached": statistics.median(warm), "uncached": statistics.median(cold)}


def kedro_mlflow_to_store(ws: Path) -> Path:
    """The workspace's project, whose `kedro run` logs through kedro-mlflow (when it is
    installed) into the workspace's SQLite store: its default (./mlruns) fails."""
    import importlib.util

    project = ws / "examples" / "digits"
    if importlib.util.find_spec("kedro_mlflow") is not None:
        (project / "conf" / "local" / "mlflow.yml").write_text(
            f"server:\n  mlflow_tracking_uri: sqlite:///{ws / 'mlflow.db'}\n"
        )
    return project


def naive(base: Path, template: Path, n: int) -> float:
    """Contender (c): seconds per `kedro run --params` subprocess, logging to MLflow through
    kedro-mlflow when it is installed (pointed at an SQLite store: its default fails)."""
    ws = workspace(base, template)
    project = kedro_mlflow_to_store(ws)
    kedro = str(Path(sys.executable).parent / "kedro")
    times = [timed([kedro, "run", "--params", f"model.C={c}"], project) for c in C_VALUES[:n]]
    return sum(times) / n


def parallel(base: Path, template: Path, jobs: int, store: Any = None, extra: tuple[str, ...] = (),
             prefix: str = "") -> dict[str, float]:
    """Throughput of a CPU-bound grid (random forests) with 2 workers against 1, timed on
    the jobs themselves (first child start to last child end). ``store(name)`` gives a
    fresh tracking URI per sweep (default: the workspace's SQLite file); ``extra``: more
    overrides (``model.runs=all``: each job logs its model), its keys start with ``prefix``."""
    from mlflow import MlflowClient

    spans = {}
    for workers in (1, 2):
        ws = workspace(base, template)
        uri = store(f"parallel{workers}") if store else f"sqlite:///{ws / 'mlflow.db'}"
        kmrun(ws, "-m", "+experiment=forest", f"params.model.n_estimators=range(100,{100 + 25 * jobs},25)",
              f"sweep.n_jobs={workers}", f"mlflow.tracking_uri={uri}", *extra)
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`kmrun.role` = 'child'", max_results=10_000)
        assert len(runs) == jobs, (len(runs), jobs)
        spans[workers] = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return {f"{prefix}parallel_jobs": jobs, f"{prefix}parallel_seconds_1": round(spans[1], 3),
            f"{prefix}parallel_seconds_2": round(spans[2], 3),
            f"{prefix}parallel_speedup": round(spans[1] / spans[2], 3)}


def postgres(base: Path, template: Path, jobs: int, n: int) -> dict[str, Any]:
    """(e) Many machines' stores: the parallel grid with PostgreSQL as the tracking store,
    and the marginal per-trial cost of a grid against `mlflow server` on PostgreSQL over
    the local SQLite file. Left out (with the reason) when PostgreSQL cannot start here."""
    sys.path.insert(0, str(ROOT / "bench"))
    import pgcluster

    why = pgcluster.unavailable()
    if why:
        return {"postgres": f"not measured: {why}"}
    cluster = pgcluster.Cluster()
    server = None
    try:
        figures = parallel(base, template, jobs, store=cluster.database)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cluster.database("server"),
             "--artifacts-destination", str(base / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")

        def grid(uri: str, cells: int) -> float:
            return kmrun(workspace(base, template), "-m", "+experiment=baseline", f"params.model.C={values(cells)}",
                         "cache=false", f"mlflow.tracking_uri={uri}", f"mlflow.experiment_name=e{time.time_ns()}")

        remote = (grid(url, BASE_TRIALS + n) - grid(url, BASE_TRIALS)) / n
        local = (grid("null", BASE_TRIALS + n) - grid("null", BASE_TRIALS)) / n
        return {"postgres_parallel_seconds_1": figures["parallel_seconds_1"],
                "postgres_parallel_seconds_2": figures["parallel_seconds_2"],
                "postgres_workers_speedup": figures["parallel_speedup"],
                "server_seconds_per_trial": round(remote, 4), "sqlite_seconds_per_trial": round(local, 4),
                "server_overhead_ratio": round(remote / local, 3)}
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        cluster.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 120) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


def ray_figures(base: Path, template: Path, n: int) -> dict[str, Any]:
    """The Ray executor: its marginal cost per trial against the local executor (the same
    grid, one job at a time, on a one-node Ray), and the speedup of two 1-CPU nodes over one
    (a grid of heavier jobs, two at a time, through an MLflow server: a file store is refused
    on two nodes). Both are timed on the jobs (first child start to last child end), as
    ``parallel`` is: joining the cluster and starting its worker processes, a fixed cost per
    command of a few seconds, is outside them (``ray_fixed_seconds`` says how much it was)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"ray_overhead_ms_per_trial": None, "ray_two_node_speedup": None, "ray_note": "ray is not installed"}
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    def span(uri: str, experiment: str) -> float:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], "tags.`kmrun.role` = 'child'", max_results=10_000)
        return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000

    def grid(cells: int, name: str, *extra: str) -> tuple[float, float]:
        ws = workspace(base, template)
        whole = kmrun(ws, "-m", "+experiment=baseline", f"params.model.C={values(cells)}", "cache=false",
                      f"mlflow.experiment_name={name}", *extra)
        return whole, span(f"sqlite:///{ws / 'mlflow.db'}", name)

    one = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        on_ray = ("sweep.executor=ray", f"ray.address={one.address}")
        cells = BASE_TRIALS + n
        local_whole, local = grid(cells, "local")
        ray_whole, remote = grid(cells, "ray", *on_ray)
        jobs = max(2, min(8, n))  # 8 heavy jobs; 2 in --tiny, whose figures mean nothing anyway
        heavy = ("-m", "+experiment=forest", f"params.model.n_estimators=range(400,{400 + 200 * jobs},200)",
                 "cache=false", "sweep.executor=ray", "sweep.n_jobs=2")
        home = Path(tempfile.mkdtemp(dir=base))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{home / 'server.db'}", "--artifacts-destination", str(home / "art"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health")
            uri = f"http://127.0.0.1:{port}"
            kmrun(workspace(base, template), *heavy, f"ray.address={one.address}", f"mlflow.tracking_uri={uri}",
                  "mlflow.experiment_name=one")
            one.add_node(num_cpus=1)
            one.wait_for_nodes()
            kmrun(workspace(base, template), *heavy, f"ray.address={one.address}", f"mlflow.tracking_uri={uri}",
                  "mlflow.experiment_name=two")
            single, double = span(uri, "one"), span(uri, "two")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
    finally:
        one.shutdown()
    return {"ray_overhead_ms_per_trial": round((remote - local) / cells * 1000, 1),
            "ray_fixed_seconds": round((ray_whole - remote) - (local_whole - local), 2),
            "ray_two_node_speedup": round(single / double, 3)}


def startup(base: Path, template: Path) -> dict[str, float]:
    """`kmrun --help`, and a whole one-trial run against bare imports of the libraries."""
    ws = workspace(base, template)
    help_time = statistics.median(kmrun(ws, "--help") for _ in range(3))
    imports = statistics.median(
        timed([sys.executable, "-c", "import mlflow, kedro.framework.session, optuna"], ws) for _ in range(3))
    first = statistics.median(kmrun(workspace(base, template), "+experiment=baseline") for _ in range(3))
    return {"help_seconds": round(help_time, 3), "imports_seconds": round(imports, 3),
            "first_trial_seconds": round(first, 3), "first_trial_ratio": round(first / imports, 3)}


def filled_store(base: Path, template: Path, n: int) -> Path:
    """A workspace whose store holds ``n`` finished runs (made with log_batch)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    ws = workspace(base, template)
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.create_experiment("digits")
    for i in range(n):
        run = client.create_run(experiment, run_name=f"r{i}")
        client.log_batch(run.info.run_id, params=[Param("model.C", str(C_VALUES[i % 80])), Param("split.seed", str(i))],
                         metrics=[Metric("accuracy", (i * 7919 % 1000) / 1000, 0, 0)])
        client.set_terminated(run.info.run_id, "FINISHED")
    return ws


def started_daemon(ws: Path, env: dict[str, str]) -> None:
    """A zygote for ``env``, started by a first command."""
    timed([sys.executable, "-m", "runner.cli", "cache"], ws, env)
    deadline = time.time() + 120
    while "pid " not in subprocess.run([sys.executable, "-m", "runner.cli", "daemon", "status"], cwd=ws,
                                       env={**ENV, **env}, capture_output=True, text=True).stdout:
        if time.time() > deadline:
            raise SystemExit("the daemon did not start")
        time.sleep(0.5)


def kedro_run(base: Path, template: Path, rounds: int) -> dict[str, Any]:
    """A single `kmrun +experiment=baseline cache=false` against `kedro run` of the same
    pipeline in the project (logging to MLflow through kedro-mlflow, when installed), whole
    commands, in interleaved rounds (medians): kmrun with the daemon and without it."""
    ws = workspace(base, template)
    project = kedro_mlflow_to_store(ws)  # as kmrun, it records the run in MLflow
    with_daemon = {"KMRUN_DAEMON": "1", "XDG_RUNTIME_DIR": tempfile.mkdtemp(dir=base)}
    started_daemon(ws, with_daemon)
    run = [sys.executable, "-m", "runner.cli", "+experiment=baseline", "cache=false"]
    times: dict[str, list[float]] = {"kedro": [], "daemon": [], "alone": []}
    try:
        for _ in range(rounds):
            times["kedro"].append(timed([sys.executable, "-m", "kedro", "run"], project))
            times["daemon"].append(timed(run, ws, with_daemon))
            times["alone"].append(timed(run, ws))
    finally:
        timed([sys.executable, "-m", "runner.cli", "daemon", "stop"], ws, with_daemon)
    kedro, daemon, alone = (statistics.median(times[k]) for k in ("kedro", "daemon", "alone"))
    return {"kedro_run_seconds": round(kedro, 3), "kmrun_run_seconds": round(daemon, 3),
            "kmrun_run_seconds_no_daemon": round(alone, 3), "kedro_run_ratio": round(daemon / kedro, 3),
            "kedro_run_ratio_no_daemon": round(alone / kedro, 3)}


def read_commands(base: Path, template: Path, n: int, reps: int = 3) -> dict[str, Any]:
    """`kmrun runs`, `kmrun best` and `kmrun show PREFIX` on a store of ``n`` finished runs,
    whole commands (median of ``reps`` each): the slowest of the three, with the daemon (a zygote
    that a first command started) and without it."""
    from mlflow import MlflowClient

    ws = filled_store(base, template, n)
    prefix = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").search_runs(["1"], max_results=1)[0].info.run_id[:8]
    commands = (["runs"], ["best"], ["show", prefix])
    with_daemon = {"KMRUN_DAEMON": "1", "XDG_RUNTIME_DIR": tempfile.mkdtemp(dir=base)}

    def slowest(env: dict[str, str]) -> float:
        return max(statistics.median(timed([sys.executable, "-m", "runner.cli", *c], ws, env) for _ in range(reps))
                   for c in commands)

    alone = slowest({})
    started_daemon(ws, with_daemon)
    try:
        served = slowest(with_daemon)
    finally:
        timed([sys.executable, "-m", "runner.cli", "daemon", "stop"], ws, with_daemon)
    return {f"read_commands_seconds_{n}": round(served, 3), f"read_commands_seconds_{n}_no_daemon": round(alone, 3)}


def runs_query(base: Path, template: Path, n: int) -> float:
    """`kmrun runs` top-10 by accuracy on a store of ``n`` finished runs, as a whole command."""
    ws = filled_store(base, template, n)
    return statistics.median(kmrun(ws, "runs", "--limit", "10", "--sort", "metrics.accuracy") for _ in range(3))


SHOW_TIMER = """
import contextlib, io, statistics, sys, time
from runner.cli import main
args = ["show", sys.argv[1], "--tracking-uri", sys.argv[2]]
times = []
for _ in range(6):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    times.append(time.perf_counter() - start)
print(statistics.median(times[1:]))
"""


def show_lookup(base: Path, template: Path, small: int, big: int) -> dict[str, float]:
    """`kmrun show` of one run by an id prefix, in-process after the first call (so that
    imports and opening the store are out): on a store of ``small`` runs and of ``big``."""
    from mlflow import MlflowClient

    seconds = {}
    for n in (small, big):
        ws = filled_store(base, template, n)
        uri = f"sqlite:///{ws / 'mlflow.db'}"
        run = MlflowClient(uri).search_runs(["1"], max_results=1)[0]
        done = subprocess.run([sys.executable, "-c", SHOW_TIMER, run.info.run_id[:8], uri], cwd=ws, env=ENV,
                              capture_output=True, text=True, check=True)
        seconds[n] = float(done.stdout.strip().splitlines()[-1])
    return {"show_seconds_small_store": round(seconds[small], 4), "show_seconds_big_store": round(seconds[big], 4),
            "show_big_store_runs": big, "show_ratio": round(seconds[big] / seconds[small], 3)}


KEYS_PROBE = """
import json, statistics, sys, time
from pathlib import Path
from runner import runtime
from runner.cache import node_keys
root = Path(sys.argv[1])
project = runtime.current().project(root, None)
pipeline = project.pipeline("__default__", [])
started = time.perf_counter()
node_keys(pipeline, project.job_params({}, "__default__", typed=True), project.catalog(), root)
first = time.perf_counter() - started
each = []
for c in range(50):  # each job: its params as Kedro resolves them, then the keys
    overrides = {"model": {"C": 0.01 * (c + 1)}}
    started = time.perf_counter()
    node_keys(pipeline, project.job_params(overrides, "__default__", typed=True), project.catalog(overrides), root)
    each.append(time.perf_counter() - started)
print(json.dumps({"first": first, "each": statistics.median(each)}))
"""

TRACE_PROBE = """
import json, statistics, sys, tempfile, time
from pathlib import Path
from runner import runtime, trace
from runner.cache import NodeCache, plan
from runner.kedro_bridge import KedroRun
root, rounds = Path(sys.argv[1]), int(sys.argv[2])
project = runtime.current().project(root, None)
pipeline = project.pipeline("__default__", [])
store = NodeCache(Path(tempfile.mkdtemp()), 2**30)
real = trace.Recorder.start, trace.Recorder.stop

def miss(c, recording):
    overrides = {"model": {"C": c}}
    job = plan(pipeline, project.job_params(overrides, "__default__", typed=True), project.catalog(overrides), root,
               store, serve=False)  # every node runs and stores its entry
    if not recording:  # the same miss, with the recording left out
        trace.Recorder.start = lambda self, ignore=(): None
        trace.Recorder.stop = lambda self, salt: trace.Ran()
    record = KedroRun(f"r{c}", cache=store, plan=job, output_dir=Path(tempfile.mkdtemp()))
    started = time.perf_counter()
    try:
        project.run(record, overrides)
    finally:
        trace.Recorder.start, trace.Recorder.stop = real
    return time.perf_counter() - started

miss(0.5, True), miss(0.5, False)
recorded, plain = [], []
for i in range(rounds):
    recorded.append(miss(0.1 * (i + 1), True))
    plain.append(miss(0.1 * (i + 1), False))
print(json.dumps({"recorded": statistics.median(recorded), "plain": statistics.median(plain)}))
"""


def trace_cost(base: Path, template: Path, rounds: int) -> dict[str, float]:
    """A miss (every node of the example runs and stores its entry) with what each node ran
    recorded, against the same miss without the recording, in one process, interleaved."""
    ws = workspace(base, template)
    done = subprocess.run([sys.executable, "-c", TRACE_PROBE, str(ws / "examples" / "digits"), str(rounds)], cwd=ws,
                          env=ENV, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"miss_seconds_recorded": round(found["recorded"], 4), "miss_seconds_unrecorded": round(found["plain"], 4),
            "trace_overhead_ratio": round(found["recorded"] / found["plain"], 3)}


def node_keys_cost(base: Path, template: Path) -> dict[str, float]:
    """The time to compute every node key of the example's pipeline: the first job of a
    process (walking the code, reading the distributions' records) and each job after it."""
    ws = workspace(base, template)
    done = subprocess.run([sys.executable, "-c", KEYS_PROBE, str(ws / "examples" / "digits")], cwd=ws, env=ENV,
                          capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {"node_keys_ms_first_job": round(found["first"] * 1000, 1),
            "node_keys_ms_per_job": round(found["each"] * 1000, 2)}


def grid_checks(base: Path, template: Path, cells: int, big: int) -> dict[str, Any]:
    """Checking a grid before its first cell: a dry run (which composes and checks every
    cell, then lists them) of ``cells`` cells against one of 10, per cell; and the peak
    memory and time of a dry run of ``big`` cells (its peak RSS, read by a parent that
    starts nothing else)."""
    ws = workspace(base, template)

    def dry(n: int) -> list[str]:
        return [sys.executable, "-m", "runner.cli", "-m", "+experiment=baseline", f"params.model.C=range(1,{n + 1})",
                "sweep.dry_run=true"]

    small = statistics.median(timed(dry(10), ws) for _ in range(2))
    per_cell = (timed(dry(cells), ws) - small) / (cells - 10)
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, *dry(big)], cwd=ws, env=ENV, capture_output=True, text=True,
                          check=True)
    seconds, peak_kb = done.stdout.split()
    label = f"{big // 1000}k" if big >= 1000 else str(big)
    return {"grid_check_ms_per_cell": round(per_cell * 1000, 3), f"dry_run_peak_mb_{label}": round(int(peak_kb) / 1024),
            f"dry_run_seconds_{label}": round(float(seconds), 1)}


def template_store(base: Path) -> Path:
    from mlflow import MlflowClient

    path = base / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer trials: under 4 minutes")
    mode.add_argument("--tiny", action="store_true", help="one trial each: a smoke test, figures mean nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    n = SIZES[size]
    started = time.perf_counter()
    results: dict[str, object] = {
        "mode": size,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": {p: _version(p) for p in ("kmrun", "kedro", "mlflow", "optuna", "hydra-core", "scikit-learn")},
        "trials": n["trials"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        template = template_store(base)
        each = per_trial(base, template, n["trials"], n["rounds"])
        results.update({
            "hand_seconds_per_trial": round(each["hand"], 4),
            "grid_seconds_per_trial": round(each["grid"], 4),
            "study_seconds_per_trial": round(each["study"], 4),
            "hand_seconds_total": round(each["hand"] * n["trials"], 3),
            "grid_seconds_total": round(each["grid"] * n["trials"], 3),
            "study_seconds_total": round(each["study"] * n["trials"], 3),
            "overhead_ms_per_trial": round((each["grid"] - each["hand"]) * 1000, 1),
            "study_overhead_ms_per_trial": round((each["study"] - each["hand"]) * 1000, 1),
            "overhead_ratio": round(each["grid"] / each["hand"], 3),
            "study_overhead_ratio": round(each["study"] / each["hand"], 3),
        })
        node_cache = cached(base, template, n["trials"], n["rounds"])
        results.update({
            "features_hand_seconds_per_trial": round(node_cache["hand"], 4),
            "cached_study_seconds_per_trial": round(node_cache["cached"], 4),
            "uncached_study_seconds_per_trial": round(node_cache["uncached"], 4),
            "cached_ratio": round(node_cache["cached"] / node_cache["hand"], 3),
            "uncached_ratio": round(node_cache["uncached"] / node_cache["hand"], 3),
        })
        results.update(node_keys_cost(base, template))
        results.update(trace_cost(base, template, {"full": 7, "quick": 3}.get(size, 1)))
        results.update(grid_checks(base, template, n["check_cells"], n["dry_run_cells"]))
        results["naive_seconds_per_trial"] = round(naive(base, template, n["naive"]), 3)
        import importlib.util

        results["naive_logs_with_kedro_mlflow"] = importlib.util.find_spec("kedro_mlflow") is not None
        results.update(parallel(base, template, n["parallel_jobs"]))
        results.update(parallel(base, template, n["parallel_jobs"], extra=("model.dataset=model", "model.runs=all"),
                                prefix="model_"))
        results.update(startup(base, template))
        results.update(kedro_run(base, template, {"full": 3, "quick": 2}.get(size, 1)))
        results["first_trial_ratio_daemon"] = round(results["kmrun_run_seconds"] / results["imports_seconds"], 3)
        results["runs_query_seconds_500" if n["store_runs"] == 500 else "runs_query_seconds_small"] = round(
            runs_query(base, template, n["store_runs"]), 3)
        results.setdefault("runs_query_seconds_500", results.get("runs_query_seconds_small"))
        results.update(show_lookup(base, template, SMALL_STORE, n["big_store"]))
        results.update(read_commands(base, template, n["big_store"], 1 if size == "tiny" else 3))
        results.update(postgres(base, template, n["parallel_jobs"], n["trials"]))
        results.update(ray_figures(base, template, n["trials"]))
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
