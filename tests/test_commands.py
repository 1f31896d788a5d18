"""kmrun runs / best / show / reproduce / promote / ui / init, against a store made by real runs."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Workspace, answers, child_runs, free_port, group_gone, make_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, template_store) -> Workspace:
    """One baseline run and a 2x2 grid, made once for this module."""
    ws = make_workspace(tmp_path_factory.mktemp("store"), template_store)
    assert ws.kmrun("+experiment=baseline").code == 0
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.01,1", "params.split.seed=0,1")
    assert done.code == 0, done.text
    return ws


def mlflow_search(ws, filter_string="", order_by=None):
    client = ws.client()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string, order_by=order_by or [], max_results=1000)


def test_runs_json_agrees_with_mlflow_search(store):
    done = store.kmrun("runs", "--filter", "metrics.accuracy > 0.9", "--sort", "metrics.accuracy", "--format", "json")
    assert done.code == 0, done.text
    rows = json.loads(done.out)
    expected = mlflow_search(store, "metrics.accuracy > 0.9", ["metrics.accuracy DESC"])
    assert {r["run_id"] for r in rows} == {r.info.run_id for r in expected}
    assert all(r["metrics"]["accuracy"] > 0.9 for r in rows)
    by_id = {r.info.run_id: r for r in expected}
    for row in rows:
        assert row["metrics"] == by_id[row["run_id"]].data.metrics
        assert row["params"] == by_id[row["run_id"]].data.params
    # children come right after their parent, parents in search order
    positions = {r["run_id"]: i for i, r in enumerate(rows)}
    for row in rows:
        if row["parent_run_id"] in positions:
            assert positions[row["parent_run_id"]] < positions[row["run_id"]]


@pytest.mark.parametrize("fmt", ["table", "csv", "md"])
def test_runs_in_each_format(store, fmt):
    done = store.kmrun("runs", "--filter", "attributes.status = 'FINISHED' and metrics.accuracy > 0",
                       "--sort", "metrics.accuracy", "--format", fmt, "--only-changed")
    assert done.code == 0, done.text
    expected = mlflow_search(store, "attributes.status = 'FINISHED' and metrics.accuracy > 0")
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(done.out)))
        assert {r["run_id"] for r in rows} == {r.info.run_id for r in expected}
        assert "params.model.C" in rows[0] and "params.model.max_iter" not in rows[0]  # --only-changed
        accuracies = [float(r["metrics.accuracy"]) for r in rows if not r["parent_run_id"]]
        assert accuracies == sorted(accuracies, reverse=True)
    elif fmt == "md":
        lines = done.out.splitlines()
        assert lines[0].startswith("| run_id | name | status") and len(lines) == 2 + len(expected)
    else:
        assert f"{len(expected)} run(s)" in done.out
        grouped = store.kmrun("runs", "--filter", "attributes.status = 'FINISHED'")
        assert grouped.code == 0 and "└ C=0.01 seed=0" in grouped.out and "sweep baseline" in grouped.out


def test_best_agrees_with_mlflow(store):
    done = store.kmrun("best")
    assert done.code == 0, done.text
    top = mlflow_search(store, "attributes.status = 'FINISHED' and metrics.accuracy > 0", ["metrics.accuracy DESC"])[0]
    assert f"best run {top.info.run_id}" in done.out and f"kmrun reproduce {top.info.run_id}" in done.out
    parent = next(r for r in mlflow_search(store) if r.data.tags.get("kmrun.role") == "parent")
    done = store.kmrun("best", "--sweep", parent.info.run_id[:8])
    children = mlflow_search(store, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", ["metrics.accuracy DESC"])
    assert done.code == 0 and f"best run {children[0].info.run_id}" in done.out


def test_show_accepts_a_prefix_and_prints_everything(store):
    run = next(r for r in mlflow_search(store) if r.info.run_name == "baseline")
    done = store.kmrun("show", run.info.run_id[:10])
    assert done.code == 0, done.text
    for text in ("model.C", "accuracy", "mlflow.source.git.commit" if "mlflow.source.git.commit" in run.data.tags else "kmrun.config_hash",
                 "config.yaml", "overrides.txt", "project_path: examples/digits", f"kmrun reproduce {run.info.run_id}"):
        assert text in done.out, text


def test_reproduce_gives_the_same_metrics_and_is_tagged(store):
    run = next(r for r in mlflow_search(store) if r.info.run_name == "C=0.01 seed=1")
    done = store.kmrun("reproduce", run.info.run_id)
    assert done.code == 0, done.text
    new = mlflow_search(store, f"tags.`kmrun.reproduced_from` = '{run.info.run_id}'")
    assert len(new) == 1
    assert new[0].data.metrics["accuracy"] == run.data.metrics["accuracy"]
    assert new[0].data.params == run.data.params
    assert "Metrics against the original run" in done.out


def test_reproduce_on_another_commit_warns_and_goes_on(ws):
    def git(*args):
        subprocess.run(["git", "-C", str(ws.path), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    assert ws.kmrun("+experiment=baseline").code == 0
    git("commit", "-q", "--allow-empty", "-m", "second")
    done = ws.kmrun("reproduce", ws.runs()[0].info.run_id)
    assert done.code == 0, done.text
    assert "Warning: the run was made at commit" in done.err and "Error" not in done.err, done.err


def test_promote_writes_an_experiment_that_reruns_the_same_params(store):
    run = next(r for r in mlflow_search(store) if r.info.run_name == "C=1 seed=0")
    done = store.kmrun("promote", run.info.run_id, "--name", "tuned")
    assert done.code == 0, done.text
    assert (store.path / "conf/experiment/tuned.yaml").is_file()
    again = store.kmrun("promote", run.info.run_id, "--name", "tuned")
    assert again.code == 2 and "--force" in again.err
    rerun = store.kmrun("+experiment=tuned")
    assert rerun.code == 0, rerun.text
    new = next(r for r in mlflow_search(store) if r.info.run_name == "tuned")
    assert new.data.params == run.data.params and new.data.metrics["accuracy"] == run.data.metrics["accuracy"]


def ambiguous_prefix(ws) -> str:
    """A first character that two run ids share: runs are added to an experiment of their own until two do."""
    client = ws.client()
    experiment = client.get_experiment_by_name("ambiguity") or client.get_experiment(client.create_experiment("ambiguity"))
    seen: set[str] = set()
    while True:
        run = client.create_run(experiment.experiment_id)
        client.set_terminated(run.info.run_id)
        if run.info.run_id[0] in seen:
            return run.info.run_id[0]
        seen.add(run.info.run_id[0])


def test_bad_subcommand_input_exits_2_with_guidance(store, tmp_path):
    shared = ambiguous_prefix(store)
    cases = [
        (["show", "ffffffffzzzz"], "No run with id 'ffffffffzzzz'"),
        (["show", ""], "Give a run id"),
        (["show", shared], "is ambiguous"),
        (["runs", "--filter", "metrics.accuracy >> 1"], "MLflow says"),
        (["runs", "--filter", "metrics.accuracy > 2"], "No runs matching"),
        (["runs", "--experiment", "nope"], "no experiment 'nope'"),
        (["runs", "--bogus"], "unrecognized arguments: --bogus"),
        (["runs", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"], "No MLflow store at"),
    ]
    for args, fragment in cases:
        done = store.kmrun(*args)
        assert done.code == 2, (args, done.text)
        assert fragment in done.err, (args, done.err)
        assert "Traceback" not in done.text


def test_an_empty_store_says_so(ws):
    done = ws.kmrun("runs")
    assert done.code == 2 and "No runs in" in done.err and "kmrun +experiment=baseline" in done.err


def test_subcommands_read_the_store_kmrun_yaml_composes_with_its_defaults_list(ws):
    """A store named in a config group that kmrun.yaml's defaults list picks is the store
    that ``kmrun runs`` reads, as for a run (not only the keys written in kmrun.yaml)."""
    (ws.path / "conf" / "store").mkdir()
    (ws.path / "conf" / "store" / "team.yaml").write_text(
        f"# @package _global_\nmlflow:\n  tracking_uri: sqlite:///{ws.path / 'team.db'}\n")
    primary = ws.path / "conf" / "kmrun.yaml"
    primary.write_text(primary.read_text().replace("  - _self_\n", "  - _self_\n  - store: team\n", 1))
    done = ws.kmrun("+experiment=baseline")
    assert done.code == 0, done.text
    assert (ws.path / "team.db").is_file() and ws.running(f"sqlite:///{ws.path / 'team.db'}") == 0
    listed = ws.kmrun("runs", "--format", "json")
    assert listed.code == 0, listed.text
    assert json.loads(listed.out)[0]["run_id"] == ws.runs(f"sqlite:///{ws.path / 'team.db'}")[0].info.run_id


def test_ui_answers_on_localhost(store):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "ui", "--port", str(port)], cwd=store.path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert answers(f"http://127.0.0.1:{port}/", seconds=90, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)  # to kmrun alone: it stops MLflow's server and its workers
        assert proc.wait(timeout=30) == 0
    assert group_gone(proc.pid)  # nothing of the server's process group is left


def test_dashboard_serves_the_study_storage_and_leaves_no_process(store):
    import optuna

    storage = f"sqlite:///{store.path / 'dashboard.db'}"
    optuna.create_study(study_name="probe", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "dashboard", "--storage", storage, "--port", str(port)],
                            cwd=store.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert answers(f"http://127.0.0.1:{port}/api/studies", seconds=90, proc=proc), proc.stdout.read() if \
            proc.poll() is not None else "no answer"
        studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10).read())
        assert [s["study_name"] for s in studies["study_summaries"]] == ["probe"]
    finally:
        proc.send_signal(signal.SIGTERM)  # to kmrun alone: it stops the dashboard
        assert proc.wait(timeout=30) == 0
    assert group_gone(proc.pid)


NODES = '''
from kedro.pipeline import Pipeline, node


def make_data(fit):
    return [i * fit["scale"] for i in range(fit["n"])]


def score(data, fit):
    return {"loss": abs(sum(data) / len(data) - fit["target"])}


def create_pipeline(**kwargs):
    return Pipeline([
        node(make_data, "params:fit", "data", name="make"),
        node(score, ["data", "params:fit"], "metrics", name="score"),
    ])
'''


def mini_project(tmp_path, catalog: str) -> Path:
    """A fresh `kedro new` project with one pipeline whose `metrics` holds {"loss": ...}."""
    (tmp_path / "cfg.yml").write_text(
        "project_name: mini\nrepo_name: mini\npython_package: mini\ntools: none\nexample_pipeline: 'no'\noutput_dir: .\n"
    )
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    kedro = Path(sys.executable).parent / "kedro"
    subprocess.run([str(kedro), "new", "-c", "cfg.yml"], cwd=tmp_path, env=env, check=True, capture_output=True)
    project = tmp_path / "mini"
    (project / "src/mini/pipelines/fit").mkdir(parents=True)
    (project / "src/mini/pipelines/fit/__init__.py").write_text(NODES)
    (project / "conf/base/parameters.yml").write_text("fit:\n  scale: 0.5\n  n: 10\n  target: 2.0\n")
    (project / "conf/base/catalog.yml").write_text(catalog)
    return project


def test_init_finds_a_free_metrics_output_and_ignores_kmruns_files(tmp_path, template_store):
    project = mini_project(tmp_path, "{}\n")  # `metrics` is a free output: a dict of floats
    (project / ".gitignore").write_text("data/\nmlflow.db\n")
    ws = Workspace(project)
    done = ws.kmrun("init")
    assert done.code == 0, done.text
    assert "ran the pipeline once: metrics in metrics (loss)" in done.out
    text = (project / "conf/kmrun.yaml").read_text()
    assert "metric: loss" in text and "direction: minimize" in text and "metrics: [metrics]" in text
    assert "params.fit.scale: interval(0.25, 0.75)" in (project / "conf/study/example.yaml").read_text()
    ignored = (project / ".gitignore").read_text().splitlines()
    assert ignored.count("mlflow.db") == 1 and {"mlartifacts/", "optuna.db", "multirun/", "kmrun-cache/"} <= set(ignored)
    assert not list(project.glob("data/**/*.json"))  # its one run wrote nothing into the project
    run = ws.kmrun("+experiment=baseline")
    assert run.code == 0, run.text
    assert ws.runs()[0].data.metrics["loss"] == 0.25
    study = (project / "conf/study/example.yaml").read_text()  # active, over the numeric params, on loss
    assert "# study:" not in study and "params.fit.n: int(interval(5, 20))" in study and "metric: loss" in study
    assert "kedro-mlflow is installed" in done.out and "--kedro-mlflow" in done.out  # the suite has it
    tuned = ws.kmrun("-m", "+experiment=baseline", "+study=example", "study.n_trials=2")
    assert tuned.code == 0, tuned.text
    (project / "conf/study/example.yaml").write_text("# @package _global_\n# study:\n#   n_trials: 2\n")
    empty = ws.kmrun("-m", "+experiment=baseline", "+study=example")
    assert empty.code == 2 and "conf/study/example.yaml holds only comments" in empty.err, empty.text


def test_init_in_a_fresh_kedro_project_then_run_and_grid(tmp_path, template_store):
    project = mini_project(tmp_path, "metrics:\n  type: json.JSONDataset\n  filepath: data/metrics.json\n")
    kedro_files = {p: p.read_bytes() for p in project.rglob("*") if p.is_file() and p.name != ".gitignore"}
    ws = Workspace(project)
    import shutil

    shutil.copy(template_store, project / "mlflow.db")
    done = ws.kmrun("init", "--kedro-mlflow")
    assert done.code == 0, done.text
    assert "kmrun +experiment=baseline" in done.out and "kedro-mlflow: wrote conf/local/mlflow.yml" in done.out
    assert all(p.read_bytes() == b for p, b in kedro_files.items() if p.name != "mlflow.db")  # Kedro's files untouched
    kedro = subprocess.run([str(Path(sys.executable).parent / "kedro"), "run"], cwd=project, capture_output=True,
                           text=True, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}, timeout=300)
    assert kedro.returncode == 0, kedro.stderr[-3000:]  # kedro-mlflow logs `kedro run` to kmrun's store
    assert [r.info.status for r in ws.runs()] == ["FINISHED"]
    assert {"kmrun.yaml", "experiment", "study"} <= {p.name for p in (project / "conf").iterdir()}
    assert ws.kmrun("init").code == 2  # never overwrites

    run = ws.kmrun("+experiment=baseline")
    assert run.code == 0, run.text
    grid = ws.kmrun("-m", "+experiment=baseline", "params.fit.scale=0.1,1", "params.fit.n=5,20")
    assert grid.code == 0, grid.text
    runs = ws.runs()
    children = child_runs(runs)
    assert len(children) == 4 and all("loss" in c.data.metrics for c in children)
    assert next(r for r in runs if r.info.run_name == "baseline").data.metrics["loss"] == 0.25


def test_cache_shows_its_entries_and_clears_them(store):
    done = store.kmrun("cache")
    assert done.code == 0, done.text
    assert f"node cache {store.path / 'kmrun-cache'}" in done.out and " load " in done.out and " split " in done.out
    cleared = store.kmrun("cache", "clear")
    assert cleared.code == 0 and "removed" in cleared.out
    assert "0 entries" in store.kmrun("cache").out


def test_best_says_what_it_ranks_together_and_compares_like_with_like(ws):
    assert ws.kmrun("+experiment=baseline").code == 0
    prod = ws.path / "examples/digits/conf/prod"
    prod.mkdir()
    (prod / "parameters.yml").write_text("split:\n  test_size: 0.3\n  seed: 42\n")
    assert ws.kmrun("+experiment=baseline", "kedro.env=prod").code == 0
    mixed = " ".join(ws.kmrun("best").out.split())
    assert "ranked runs of 2 Kedro envs (local, prod)" in mixed and "2 versions of the code, data" in mixed
    local = ws.kmrun("best", "--env", "local")
    assert local.code == 0 and "Kedro envs" not in local.out and "versions" not in local.out
    current = ws.kmrun("best", "--current", "--env", "local")
    assert current.code == 0 and "versions" not in current.out, current.text
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace("/ 16.0", "/ 8.0"))
    stale = ws.kmrun("best", "--current")
    assert stale.code == 2 and "No FINISHED run of the current code and data (--current)" in " ".join(stale.err.split())
