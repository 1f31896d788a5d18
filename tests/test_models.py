"""MLflow Models from YAML: a packaged inference pipeline, the registry, and serving it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import answers, free_port, group_gone

pytestmark = pytest.mark.slow


def images(ws) -> pd.DataFrame:
    return pd.read_csv(ws.path / "examples/digits/data/01_raw/sample_images.csv")


def kedro_predictions(ws, model_file: Path) -> list[int]:
    """What the project's own `inference` nodes predict with the trained model."""
    sys.path.insert(0, str(ws.path / "examples/digits/src"))
    try:
        from digits.pipelines.train.nodes import features, predict
    finally:
        sys.path.pop(0)
    estimator = pickle.loads(model_file.read_bytes())
    return [int(v) for v in predict(estimator, features(images(ws)))]


def serve(ws, model: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """``kmrun serve MODEL`` in its own process group, on a free port."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve", model, "--port", str(port)],
                              cwd=ws.path, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return server, port


def served_predictions(ws, server: subprocess.Popen, port: int) -> list:
    """What the served model answers for the sample images, once it is up."""
    assert answers(f"http://127.0.0.1:{port}/ping"), server.stdout.read1().decode() if server.stdout else ""
    body = json.dumps({"dataframe_split": images(ws).to_dict(orient="split")}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]


def test_a_study_registers_its_best_model_and_kmrun_serve_predicts_like_the_pipeline(ws):
    done = ws.kmrun("-m", "+experiment=packaged", "+study=tune", "study.n_trials=4", "study.n_jobs=2",
                    "study.register_best=digits")
    assert done.code == 0, done.text
    assert "Registered as digits version 1" in done.out
    _, trials = ws.family("trial")
    best = max(trials, key=lambda r: r.data.metrics["accuracy"])
    with_model = [r for r in trials if "kmrun.model" in r.data.tags]
    assert [r.info.run_id for r in with_model] == [best.info.run_id]  # model.runs: best, by default
    versions = ws.client().search_model_versions("name = 'digits'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", best.info.run_id)]
    assert not list(ws.path.glob("multirun/*/*/.kmrun-models"))  # the staged models are gone

    model_file = Path(best.data.tags["kmrun.output_dir"]) / "data/06_models/model.pkl"
    expected = kedro_predictions(ws, model_file)
    listed = ws.kmrun("models")
    assert listed.code == 0 and "digits" in listed.out and best.info.run_id in listed.out

    server, port = serve(ws, "digits")
    try:
        assert served_predictions(ws, server, port) == expected
    finally:
        server.send_signal(signal.SIGTERM)  # to kmrun alone: it stops MLflow's server and its workers
        assert server.wait(timeout=30) == 0
    assert group_gone(server.pid)  # nothing of the server's process group is left
    said = server.stdout.read().decode() if server.stdout else ""
    assert said.startswith("Serving models:/digits") and said.count("\n") == 1, said  # one line: no bars, no logs
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def servers_on(port: int) -> list[int]:
    """Processes whose command line names ``port`` (a server kmrun started)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"--port\0{port}\0" in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_serve_answers_bad_input_without_a_stack_trace_and_dies_with_kmrun(ws):
    done = ws.kmrun("+experiment=packaged")
    assert done.code == 0, done.text
    server, port = serve(ws, ws.runs()[0].info.run_id)
    try:
        assert served_predictions(ws, server, port)  # the model answers good input
        frame = images(ws).head(1).astype(float)
        frame.iloc[0, 0] = float("nan")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        reply = json.loads(refused.value.read())
        assert refused.value.code == 400 and reply["message"] and reply["error_code"] == "BAD_REQUEST", reply
        assert "stack_trace" not in reply and "Traceback" not in json.dumps(reply), reply
        assert servers_on(port)
    finally:
        server.kill()  # kill -9: kmrun cannot stop the server itself
        server.wait(timeout=30)
    deadline = time.time() + 30
    while servers_on(port) and time.time() < deadline:
        time.sleep(0.5)
    assert servers_on(port) == []  # the server and its workers died with kmrun
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_the_packaged_pipeline_loads_in_a_fresh_process_and_holds_no_secret(ws, tmp_path):
    secret = str(ws.path)  # a secret-named variable whose value appears in what MLflow writes (paths)
    done = ws.kmrun("+experiment=packaged", env={"DEPLOY_API_TOKEN": secret})
    assert done.code == 0, done.text
    run = ws.runs()[0]
    assert run.data.tags["kmrun.model"] == "pyfunc"
    folder = Path(run.info.artifact_uri.removeprefix("file://")) / "model"
    texts = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".txt", "")]
    assert {p.name for p in texts} >= {"MLmodel", "requirements.txt", "conda.yaml", "input_example.json"}
    for path in texts:
        assert secret not in path.read_text(), path
    script = (
        "import importlib.util, json, mlflow, pandas as pd\n"
        "assert importlib.util.find_spec('digits') is None  # the package comes from the model's code/\n"
        f"model = mlflow.pyfunc.load_model({f'runs:/{run.info.run_id}/model'!r})\n"
        f"print(json.dumps([int(v) for v in model.predict(pd.read_csv({str(ws.path / 'examples/digits/data/01_raw/sample_images.csv')!r}))]))\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                "MLFLOW_TRACKING_URI": ws.uri})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    predicted = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert predicted == kedro_predictions(ws, ws.path / "examples/digits/data/06_models/model.pkl")


def test_a_grid_with_model_runs_all_logs_a_sklearn_model_per_cell_and_dataset_files(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1", "model.dataset=model",
                    "model.runs=all", "model.input_example=sample_images", "artifacts=[training_curve]",
                    "sweep.register_best=digits-grid")
    assert done.code == 0, done.text
    _, children = ws.family()
    assert len(children) == 2
    client = ws.client()
    for child in children:
        assert child.data.tags["kmrun.model"] == "sklearn"
        assert Path(child.data.tags["kmrun.output_dir"]).is_dir()  # each child says where its outputs are
        listed = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        assert "model/MLmodel" in listed and "model/input_example.json" in listed
        assert {a.path for a in client.list_artifacts(child.info.run_id, "outputs")} == {
            "outputs/training_curve.json"}
    best = max(children, key=lambda r: r.data.metrics["accuracy"])
    assert [v.run_id for v in client.search_model_versions("name = 'digits-grid'")] == [best.info.run_id]
    register = ws.kmrun("register", children[0].info.run_id[:10], "--name", "digits-lr", "--alias", "champion")
    assert register.code == 0, register.text
    model = ws.client().get_registered_model("digits-lr")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}


def test_model_input_errors_name_the_key_and_the_fix(ws):
    cases = [
        (("+experiment=baseline", "model.dataset=modle"), "model.dataset 'modle' is not a dataset", "Did you mean model"),
        (("+experiment=baseline", "model.dataset=model", "model.flavor=xgboost"), "needs the xgboost package",
         "pip install xgboost"),
        (("+experiment=baseline", "model.pipeline=inferense", "model.pipeline_input=images"),
         "model.pipeline: no pipeline named 'inferense'", "Did you mean inference"),
        (("+experiment=baseline", "model.pipeline=inference"), "model.pipeline_input is not set", "raw input"),
        (("+experiment=baseline", "model.dataset=model", "model.runs=some"), "model.runs is 'some'", "best, all"),
        (("+experiment=baseline", "artifacts=[nope]"), "artifacts: 'nope' is not a dataset with a file", "model"),
        (("-m", "+experiment=baseline", "params.model.C=1,2", "sweep.register_best=x"), "no model is logged",
         "model.dataset"),
    ]
    for args, message, fix in cases:
        done = ws.kmrun(*args)
        assert done.code == 2, (args, done.text)
        assert message in done.err and fix in done.err, (args, done.err)
        assert "Traceback" not in done.text
    assert ws.running() == 0
    plain = ws.kmrun("+experiment=baseline")
    assert plain.code == 0
    run_id = ws.runs()[0].info.run_id
    for args, message in ((("serve", run_id), "has no model"), (("register", run_id, "--name", "x"), "has no model"),
                          (("serve", "nothing-here"), "neither a registered model nor a run id")):
        done = ws.kmrun(*args)
        assert done.code == 2 and message in done.err, (args, done.text)


def test_a_random_forest_is_saved_with_the_sklearn_flavor_and_predicts_like_the_trained_one(ws):
    """MLflow saves scikit-learn models with skops, which refuses a forest's tree type
    unless told to trust it: kmrun trusts the types of the model its run just trained."""
    import mlflow.pyfunc

    done = ws.kmrun("+experiment=forest", "model.dataset=model", "params.model.n_estimators=20")
    assert done.code == 0, done.text
    run = ws.runs()[0]
    assert run.data.tags["kmrun.model"] == "sklearn"
    loaded = mlflow.pyfunc.load_model(f"{run.info.artifact_uri}/model")
    sys.path.insert(0, str(ws.path / "examples/digits/src"))
    try:
        from digits.pipelines.train.nodes import features
    finally:
        sys.path.pop(0)
    trained = pickle.loads(next(ws.path.glob("examples/digits/data/06_models/model.pkl")).read_bytes())
    X = features(images(ws))
    assert [int(v) for v in loaded.predict(X)] == [int(v) for v in trained.predict(X)]
