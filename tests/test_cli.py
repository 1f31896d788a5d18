"""End to end through the real CLI, in a temp dir, against a real SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import child_runs

pytestmark = pytest.mark.slow


def only_run(ws, uri=None):
    runs = ws.runs(uri)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_baseline_run_records_everything(ws):
    (ws.path / ".gitignore").write_text("mlflow.db\nmlartifacts/\noutputs/\n")
    subprocess.run(["git", "init", "-q"], cwd=ws.path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=ws.path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], cwd=ws.path, check=True
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.path, capture_output=True, text=True).stdout.strip()

    done = ws.kmrun("+experiment=baseline")
    assert done.code == 0, done.text
    run = only_run(ws)
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline"
    params = run.data.params
    for key in ("split.test_size", "split.seed", "model.type", "model.C", "model.max_iter",
                "model.n_estimators", "model.max_depth", "model.alpha", "model.epochs", "model.seed"):
        assert key in params, key
    assert params["model.C"] == "1.0"
    assert 0.9 < run.data.metrics["accuracy"] <= 1.0
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == head and tags["kmrun.git.dirty"] == "false"
    assert tags["kmrun.overrides"] == "+experiment=baseline"
    assert tags["kedro.pipeline"] == "__default__" and tags["kedro.env"] == "local"
    assert tags["kedro.run_id"] and len(tags["kmrun.config_hash"]) == 16
    artifacts = {a.path for a in ws.client().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt"} <= artifacts
    config = ws.client().download_artifacts(run.info.run_id, "config.yaml", str(ws.path))
    assert "project_path: examples/digits" in open(config).read()
    # the summary names the run, the objective, the store and the UI command
    assert run.info.run_id in done.out and "accuracy" in done.out and "mlflow ui" in done.out
    assert (ws.path / "examples/digits/data/06_models/model.pkl").exists()


def test_cli_override_changes_param_and_metric_and_env_var_moves_the_store(ws):
    other = ws.path / "other.db"
    done = ws.kmrun("+experiment=baseline", "params.model.C=0.002", env={"MLFLOW_TRACKING_URI": f"sqlite:///{other}"})
    assert done.code == 0, done.text
    assert ws.runs() == []  # the default store was not used
    run = only_run(ws, f"sqlite:///{other}")
    assert run.data.params["model.C"] == "0.002"
    assert run.data.metrics["accuracy"] < 0.9  # C=1.0 gives > 0.95 on this split


def test_second_experiment_swaps_the_model_by_yaml(ws):
    done = ws.kmrun("+experiment=forest")
    assert done.code == 0, done.text
    run = only_run(ws)
    assert run.data.params["model.type"] == "random_forest"
    assert run.data.params["model.n_estimators"] == "200"
    assert run.data.metrics["accuracy"] > 0.9


def test_kedro_mlflow_installed_opens_no_second_run(ws):
    import importlib.util

    assert importlib.util.find_spec("kedro_mlflow") is not None  # the dev extra installs it
    done = ws.kmrun("+experiment=baseline", "-v")
    assert done.code == 0, done.text
    assert "kedro-mlflow's hook is off for kmrun runs" in done.text
    assert [r.info.status for r in ws.runs()] == ["FINISHED"]
    assert not list(ws.path.rglob("mlruns"))  # kedro-mlflow's own default store was never created
    assert ws.running() == 0


def test_a_dry_run_imports_neither_mlflow_nor_kedro_mlflows_hook(ws):
    """Checking a grid loads the Kedro project, whose installed kedro-mlflow hook kmrun turns
    off: blocked before Kedro imports it (1.7 s, 50 MB), as is MLflow's name check."""
    code = (
        "import sys; from runner.cli import main\n"
        "try: main(['-m', '+experiment=baseline', 'params.model.C=0.1,0.2', 'sweep.dry_run=true'])\n"
        "except SystemExit as done: assert not done.code, done.code\n"
        "from kedro.framework.project import settings\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('mlflow', 'kedro_mlflow')], 'imported'\n"
        "assert 'kedro-mlflow' not in settings.DISABLE_HOOKS_FOR_PLUGINS  # the project's settings are as they were"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ws.path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 cells" in done.stdout or "params.model.C=0.2" in done.stdout, done.stdout


def test_help_is_kmruns_and_hydras_and_imports_no_mlflow_or_optuna(ws):
    code = (
        "import sys; from runner.cli import main; main(['--help']);"
        "assert 'mlflow' not in sys.modules and 'optuna' not in sys.modules, 'heavy import'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ws.path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: kmrun" in done.stdout and "experiment: baseline, forest" in done.stdout


def test_python_api_returns_run_id_metrics_and_objective(ws, monkeypatch):
    monkeypatch.chdir(ws.path)
    import runner

    result = runner.run(["+experiment=baseline", "params.model.C=0.5"])
    assert result.status == "FINISHED" and result.objective == result.metrics["accuracy"]
    run = ws.client().get_run(result.run_id)
    assert run.data.params["model.C"] == "0.5" and run.data.metrics["accuracy"] == result.objective
    with pytest.raises(runner.KmrunError, match="modle"):
        runner.run(["+experiment=baseline", "params.modle.C=0.5"])


def test_a_second_run_takes_the_unchanged_nodes_from_the_cache_and_says_so(ws):
    first = ws.kmrun("+experiment=baseline", "params.model.C=1")
    assert first.code == 0, first.text
    second = ws.kmrun("+experiment=baseline", "params.model.C=2")
    assert second.code == 0, second.text
    runs = sorted(ws.runs(), key=lambda r: r.info.start_time)
    assert runs[0].data.tags["kmrun.cache.hits"] == "none"
    assert runs[1].data.tags["kmrun.cache.hits"] == "load,split"  # train and evaluate read model.C
    assert runs[1].data.tags["kmrun.cache.from"] == runs[0].info.run_id
    assert "load, split from the node cache" in second.out
    again = ws.kmrun("+experiment=baseline", "params.model.C=2", "cache=false")
    latest = sorted(ws.runs(), key=lambda r: r.info.start_time)[-1]
    assert latest.data.tags["kmrun.cache"] == "refresh" and latest.data.tags["kmrun.cache.hits"] == "none"
    assert again.code == 0 and runs[1].data.metrics["accuracy"] == ws.runs()[0].data.metrics["accuracy"]


def test_kedro_mlflow_datasets_and_a_nodes_own_mlflow_calls_land_in_the_jobs_run(ws):
    (ws.path / "examples/digits/conf/base/catalog.yml").write_text(
        "model:\n  type: kedro_mlflow.io.artifacts.MlflowArtifactDataset\n  dataset:\n"
        "    type: pickle.PickleDataset\n    filepath: data/06_models/model.pkl\n")
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace(
        "    predicted = estimator.predict(X_test)\n",
        "    predicted = estimator.predict(X_test)\n    __import__('mlflow').log_metric('from_node', 1.0)\n"))
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1", "sweep.n_jobs=2")
    assert done.code == 0, done.text
    runs = ws.runs()
    assert {r.data.tags.get("kmrun.role") for r in runs} == {"parent", "child"}  # no run of kedro-mlflow's own
    children = child_runs(runs)
    for child in children:
        assert child.data.metrics["from_node"] == 1.0 and child.info.status == "FINISHED"
        assert "model.pkl" in {a.path for a in ws.client().list_artifacts(child.info.run_id)}
        cell = child.data.tags["kmrun.cell"]
        assert len(list(ws.path.glob(f"multirun/*/*/{cell}/data/06_models/model.pkl"))) == 1  # kept apart
    assert not (ws.path / "examples/digits/data/06_models/model.pkl").exists()
    assert ws.running() == 0


def test_kedro_mlflows_metric_datasets_feed_the_objective_in_a_run_a_parallel_grid_and_a_study(ws):
    """A project that logs with kedro-mlflow's metric datasets, the {"value", "step"} shape:
    the datasets log into the job's own run, and kmrun reads the shape as numbers."""
    catalog = ws.path / "examples/digits/conf/base/catalog.yml"
    catalog.write_text(catalog.read_text().replace(
        "metrics:\n  type: json.JSONDataset\n  filepath: data/08_reporting/metrics.json",
        "metrics:\n  type: kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset"))
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    source = nodes.read_text()
    shaped = 'return {name: {"value": value, "step": 0} for name, value in {\n        "accuracy"'
    nodes.write_text(source.replace('return {\n        "accuracy"', shaped).replace(
        '"f1_macro": float(f1_score(y_test, predicted, average="macro")),\n    }',
        '"f1_macro": float(f1_score(y_test, predicted, average="macro")),\n    }.items()}'))
    assert nodes.read_text() != source
    commands = [("+experiment=baseline",),
                ("-m", "+experiment=baseline", "params.model.C=0.1,1", "sweep.n_jobs=2"),
                ("-m", "+experiment=baseline", "+study=tune", "study.n_trials=3")]
    for args in commands:
        done = ws.kmrun(*args)
        assert done.code == 0, (args, done.text)
    runs = ws.runs()
    assert all("kmrun.config_hash" in r.data.tags or r.data.tags.get("kmrun.role") == "parent" for r in runs)
    jobs = [r for r in runs if r.data.tags.get("kmrun.role") != "parent"]  # (no stray run of kedro-mlflow's)
    assert len(jobs) == 1 + 2 + 3
    client = ws.client()
    for run in jobs:
        assert run.info.status == "FINISHED" and 0.5 < run.data.metrics["accuracy"] <= 1
        assert "f1_macro" in run.data.metrics
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.value for m in history] == [run.data.metrics["accuracy"]]  # logged once: by kedro-mlflow's dataset
    study = next(r for r in runs if r.data.tags.get("kmrun.kind") == "study")
    assert study.data.metrics["best_accuracy"] == max(
        r.data.metrics["accuracy"] for r in jobs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id)
    assert ws.running() == 0


def test_a_relative_cache_dir_is_one_folder_from_any_subfolder(ws):
    conf = ws.path / "conf/kmrun.yaml"
    conf.write_text(conf.read_text() + "\ncache:\n  dir: mycache\n")
    sub = ws.path / "examples"
    done = subprocess.run([sys.executable, "-m", "runner.cli", "+experiment=baseline"], cwd=sub, capture_output=True,
                          text=True, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (ws.path / "mycache").is_dir() and not (sub / "mycache").exists()
    cleared = ws.kmrun("cache", "clear")
    assert cleared.code == 0 and "removed 4 entries" in cleared.out, cleared.text
    assert ws.kmrun("+experiment=baseline").code == 0
    assert sorted(ws.runs(), key=lambda r: r.info.start_time)[-1].data.tags["kmrun.cache.hits"] == "none"
