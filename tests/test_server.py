"""kmrun against a real `mlflow server` (started here, stopped here): a run, a grid, a
study and the subcommands, with artifacts served by the server."""

from __future__ import annotations

import pytest
from conftest import mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An MLflow tracking server on 127.0.0.1 with its own database and proxied artifacts."""
    home = tmp_path_factory.mktemp("server")
    with mlflow_server(home, f"sqlite:///{home / 'server.db'}") as url:
        yield url, home


def test_a_run_a_grid_and_a_study_against_an_mlflow_server(ws, server):
    url, home = server
    store = ["mlflow.tracking_uri=" + url, "mlflow.experiment_name=server-" + ws.path.name]
    done = ws.kmrun("+experiment=baseline", *store)
    assert done.code == 0, done.text
    grid = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1", "sweep.n_jobs=2", *store)
    assert grid.code == 0, grid.text
    no_storage = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=2", *store)
    assert no_storage.code == 2 and "study.storage is not set" in no_storage.err, no_storage.text
    study = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=3",
                     f"study.storage=sqlite:///{ws.path / 'optuna.db'}", *store)
    assert study.code == 0, study.text

    runs = ws.runs(url)
    mine = [r for r in runs if r.data.tags.get("kmrun.config_hash")]
    assert len(mine) == 1 + 2 + 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # served by the server
    assert list(home.glob("artifacts/*/*/artifacts/config.yaml"))  # ...and stored where it keeps them
    assert not (ws.path / "mlruns").exists() and not (ws.path / "mlflow.db.lock").exists()

    env = {"MLFLOW_TRACKING_URI": url}
    experiment = ["--experiment", "server-" + ws.path.name]
    listed = ws.kmrun("runs", *experiment, "--format", "json", env=env)
    assert listed.code == 0 and mine[0].info.run_id in listed.out, listed.text
    best = ws.kmrun("best", *experiment, env=env)
    assert best.code == 0, best.text
    shown = ws.kmrun("show", mine[0].info.run_id[:10], env=env)
    assert shown.code == 0 and "config.yaml" in shown.out, shown.text
    again = ws.kmrun("reproduce", mine[0].info.run_id, env=env)
    assert again.code == 0, again.text
    promoted = ws.kmrun("promote", mine[0].info.run_id, "--name", "from_server", env=env)
    assert promoted.code == 0 and (ws.path / "conf/experiment/from_server.yaml").is_file(), promoted.text
    assert not [r for r in ws.runs(url) if r.info.status == "RUNNING"]
    assert ws.runs() == []  # nothing went to the local store


def test_register_models_and_serve_against_an_mlflow_server(ws, server):
    """The model commands on a server's registry, with the model's files fetched from it."""
    import signal

    from test_models import kedro_predictions, serve, served_predictions

    url, _ = server
    env = {"MLFLOW_TRACKING_URI": url}
    done = ws.kmrun("+experiment=packaged", "mlflow.experiment_name=served-" + ws.path.name, env=env)
    assert done.code == 0, done.text
    (run,) = [r for r in ws.runs(url) if r.data.tags.get("mlflow.runName") == "packaged"
              and r.info.experiment_id == ws.client(url).get_experiment_by_name("served-" + ws.path.name).experiment_id]
    registered = ws.kmrun("register", run.info.run_id[:10], "--name", "digits-server", "--alias", "live", env=env)
    assert registered.code == 0, registered.text
    listed = ws.kmrun("models", env=env)
    assert listed.code == 0 and "digits-server" in listed.out and run.info.run_id in listed.out, listed.text

    expected = kedro_predictions(ws, ws.path / "examples/digits/data/06_models/model.pkl")  # a run writes in place
    serving, port = serve(ws, "digits-server@live", env)
    try:
        assert served_predictions(ws, serving, port) == expected
    finally:
        serving.send_signal(signal.SIGTERM)
        assert serving.wait(timeout=30) == 0
