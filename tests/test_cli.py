"""End to end through the real CLI, in a temp dir, against a real SQLite store."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runner.tracking import REDACTED

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


BAD_INPUT = [
    (["params.modle.C=5"], "no parameter 'modle'. Did you mean params.model"),
    (["params.model.C=abc"], "'abc' (str) does not fit the parameter's float value"),
    (["+experiment=nope"], "Could not find 'experiment/nope'"),
    (["mlflow.trackin_uri=x"], "Unknown key 'mlflow.trackin_uri' in 'mlflow' (command line: mlflow.trackin_uri=x). Did you mean 'tracking_uri'"),
    (["kedro.project_path=/"], "is not a Kedro project"),
    (["kedro.pipeline=trian"], "no pipeline named 'trian'"),
    (["mlflow.tracking_uri=foo://bar"], "cannot open the MLflow store 'foo://bar'"),
    (["kedro.env=prod"], "no environment 'prod'"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUT)
def test_bad_input_exits_2_with_one_message_and_no_run(ws, args, fragment):
    done = ws.kmrun("+experiment=baseline", *args)
    assert done.code == 2, done.text
    assert fragment in done.err
    assert "Traceback" not in done.text
    assert ws.runs() == []


def test_unknown_experiment_lists_the_available_ones(ws):
    done = ws.kmrun("+experiment=basline")
    assert done.code == 2 and "baseline" in done.err and "forest" in done.err


def test_yaml_syntax_error_names_file_and_line(ws):
    (ws.path / "conf/experiment/broken.yaml").write_text("# @package _global_\nparams:\n  model: {C: 1\n")
    done = ws.kmrun("+experiment=broken")
    assert done.code == 2, done.text
    assert "broken.yaml" in done.err and "line" in done.err
    assert "Traceback" not in done.text


def test_unknown_key_in_a_config_file_names_the_key(ws):
    (ws.path / "conf/experiment/typo.yaml").write_text("# @package _global_\nobjective:\n  metrc: accuracy\n")
    done = ws.kmrun("+experiment=typo")
    assert done.code == 2 and "Unknown key 'objective.metrc'" in done.err and "Did you mean 'metric'" in done.err


def test_param_typo_in_an_experiment_file_names_the_file(ws):
    (ws.path / "conf/experiment/typo.yaml").write_text("# @package _global_\nparams:\n  split:\n    sed: 3\n")
    done = ws.kmrun("+experiment=typo")
    assert done.code == 2 and "params.split.sed (in conf/experiment/typo.yaml)" in done.err
    assert "params.split.seed" in done.err


def test_verbose_shows_the_traceback(ws):
    done = ws.kmrun("+experiment=baseline", "params.modle.C=5", "-v")
    assert done.code == 2 and "Traceback" in done.text


def test_missing_objective_metric_fails_the_run_and_names_the_datasets(ws):
    done = ws.kmrun("+experiment=baseline", "objective.metric=auc")
    assert done.code == 2, done.text
    assert "'auc' was not produced" in done.err and "accuracy, f1_macro" in done.err
    run = only_run(ws)
    assert run.info.status == "FAILED"
    assert "traceback.txt" in {a.path for a in ws.client().list_artifacts(run.info.run_id)}
    assert ws.running() == 0


def test_a_failing_node_fails_the_run_with_exit_1(ws):
    done = ws.kmrun("+experiment=baseline", "params.model.type=svm")
    assert done.code == 1, done.text
    assert "ValueError" in done.err and "Unknown model.type 'svm'" in done.err
    assert "Traceback" not in done.text
    run = only_run(ws)
    assert run.info.status == "FAILED" and ws.running() == 0


def test_secrets_never_reach_the_store(ws, monkeypatch):
    project = ws.path / "examples/digits"
    with open(project / "conf/base/parameters.yml", "a") as f:
        f.write("db_password: hunter2-in-params\nservice:\n  api_token: tok-in-params-77\n")
    (project / "conf/local/credentials.yml").write_text(
        "warehouse:\n  user: admin\n  password: cred-secret-991\n  key: ${oc.env:KMRUN_TEST_API_KEY}\n"
    )
    secrets = ["hunter2-in-params", "tok-in-params-77", "cred-secret-991", "env-secret-554", "cli-secret-332"]
    done = ws.kmrun(
        "+experiment=baseline",
        "params.db_password=cli-secret-332",
        env={"KMRUN_TEST_API_KEY": "env-secret-554"},
    )
    assert done.code == 0, done.text
    run = only_run(ws)
    assert run.data.params["db_password"] == REDACTED
    assert run.data.params["service.api_token"] == REDACTED
    stored = list(run.data.params.values()) + list(run.data.tags.values())
    client = ws.client()
    for artifact in client.list_artifacts(run.info.run_id):
        stored.append(open(client.download_artifacts(run.info.run_id, artifact.path, str(ws.path))).read())
    stored.append(done.text)
    leaks = [s for s in secrets for text in stored if s in text]
    assert leaks == []


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
