"""No secret reaches MLflow: not from Kedro credentials, parameters named like secrets,
environment variables, or the command line; after a run, a grid and a study."""

from __future__ import annotations

import pytest
from conftest import child_runs

from runner.redact import REDACTED

pytestmark = pytest.mark.slow

SECRETS = ["hunter2-in-params", "tok-in-params-77", "cred-secret-991", "env-secret-554", "cli-secret-332"]


def everything_stored(ws) -> list[str]:
    """Every param, tag and text artifact of every run in the store."""
    client, texts = ws.client(), []

    def walk(run_id, path=None):
        for item in client.list_artifacts(run_id, path):
            if item.is_dir:
                walk(run_id, item.path)
            else:
                local = client.download_artifacts(run_id, item.path, str(ws.path / "downloads"))
                texts.append(open(local, "rb").read().decode("utf-8", errors="replace"))

    (ws.path / "downloads").mkdir(exist_ok=True)
    for run in ws.runs():
        texts += list(run.data.params.values()) + list(run.data.params) + list(run.data.tags.values())
        walk(run.info.run_id)
    return texts


def test_no_secret_in_any_param_tag_or_artifact_after_a_run_a_grid_and_a_study(ws):
    project = ws.path / "examples/digits"
    with open(project / "conf/base/parameters.yml", "a") as f:
        f.write("db_password: hunter2-in-params\nservice:\n  api_token: tok-in-params-77\n")
    (project / "conf/local/credentials.yml").write_text(
        "warehouse:\n  user: admin\n  password: cred-secret-991\n  key: ${oc.env:KMRUN_TEST_API_KEY}\n"
    )
    env = {"KMRUN_TEST_API_KEY": "env-secret-554", "MY_SERVICE_TOKEN": "env-secret-554"}
    outputs = []
    for args in (
        ["+experiment=baseline", "params.db_password=cli-secret-332"],
        ["-m", "+experiment=baseline", "params.model.C=0.1,1", "params.db_password=cli-secret-332"],
        ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=3", "params.db_password=cli-secret-332"],
    ):
        done = ws.kmrun(*args, env=env)
        assert done.code == 0, done.text
        outputs.append(done.text)
    runs = ws.runs()
    assert len(runs) == 1 + 3 + 4
    for run in runs:
        if "db_password" in run.data.params:
            assert run.data.params["db_password"] == REDACTED
            assert run.data.params["service.api_token"] == REDACTED
    stored = everything_stored(ws) + outputs
    leaks = sorted({secret for secret in SECRETS for text in stored if secret in text})
    assert leaks == []


def test_a_secret_on_the_command_line_is_in_no_file_under_the_working_directory(ws):
    secret = "cli-disk-secret-4242"
    for args in (["+experiment=baseline", f"+params.api_token={secret}"],
                 ["-m", "+experiment=baseline", "params.model.C=0.1,1", f"+params.api_token={secret}"]):
        done = ws.kmrun(*args)
        assert done.code == 0, done.text
        assert secret not in done.text
    files = [p for p in ws.path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("multirun" in p.parts for p in files)
    holding = [str(p.relative_to(ws.path)) for p in files if secret.encode() in p.read_bytes()]
    assert holding == []


def scan(ws, planted: list[str], outputs: list[str]) -> list[str]:
    """Where any planted value appears: a file under the working directory (the MLflow
    store, its artifacts, the Optuna storage, job outputs) or the captured output."""
    found = []
    for path in ws.path.rglob("*"):
        if path.is_file() and path.suffix not in (".yml", ".yaml", ".lock"):  # the user's own config holds them
            data = path.read_bytes()
            found += [f"{secret} in {path.relative_to(ws.path)}" for secret in planted if secret.encode() in data]
    found += [f"{secret} in the output" for secret in planted for text in outputs if secret in text]
    return found


def test_non_string_and_list_secrets_and_swept_secrets_are_hidden_everywhere(ws):
    params = ws.path / "examples/digits/conf/base/parameters.yml"
    params.write_text(params.read_text() + "db_password: original-pw-1\n")
    planted = ["98765432", "tokA1", "tokB2", "swept-aaaa", "swept-bbbb", "original-pw-1"]
    outputs = []
    for args in (
        ["+experiment=baseline", "+params.db_pin_secret=98765432", "+params.api_tokens=[tokA1,tokB2]"],
        ["-m", "+experiment=baseline", "params.db_password=swept-aaaa,swept-bbbb", "+params.db_pin_secret=98765432"],
    ):
        done = ws.kmrun(*args)
        assert done.code == 0, done.text
        outputs.append(done.text)
    assert scan(ws, planted, outputs) == []
    children = child_runs(ws.runs())
    assert sorted(r.info.run_name for r in children) == ["db_password=***", "db_password=***"]
    assert {r.data.params["db_password"] for r in children} == {REDACTED}


def test_a_study_refuses_to_search_a_secret(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "+params.api_token=choice(cccc1,dddd2)")
    assert done.code == 2 and "names a secret" in done.err and "Traceback" not in done.err
    assert scan(ws, ["cccc1", "dddd2"], []) == []


def test_credentials_in_the_tracking_uri_are_never_shown(ws):
    done = ws.kmrun("+experiment=baseline", "mlflow.tracking_uri=http://admin:hunter-pw-77@127.0.0.1:1")
    assert done.code == 2 and "cannot reach the MLflow server" in done.err and "admin:***@127.0.0.1" in done.err
    assert scan(ws, ["hunter-pw-77"], [done.text]) == []


def test_keys_that_only_look_like_secrets_are_logged_and_common_values_stay(ws):
    done = ws.kmrun("+experiment=baseline", "+params.tokenizer.max_tokens=2048", "+params.tokenizer.use_fast=true",
                    env={"TOKENIZERS_PARALLELISM": "false", "MY_API_TOKEN": "1"})
    assert done.code == 0, done.text
    run = ws.runs()[0]
    assert run.data.params["tokenizer.max_tokens"] == "2048" and run.data.params["tokenizer.use_fast"] == "True"
    assert not [k for k, v in run.data.tags.items() if REDACTED in v]  # "false" and "1" are not secrets


def test_a_secret_in_a_run_name_is_masked_in_the_store_and_the_output(ws):
    done = ws.kmrun("+experiment=baseline", "+params.db_password=name-secret-8080",
                    "mlflow.run_name=run-name-secret-8080")
    assert done.code == 0, done.text
    (run,) = ws.runs()
    assert run.info.run_name == "run-***" and "name-secret-8080" not in done.text
    assert not [text for text in everything_stored(ws) if "name-secret-8080" in text]


def test_a_node_error_that_quotes_a_secret_is_masked_in_the_terminal(ws):
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace(
        "def split_data(data: pd.DataFrame, split: dict[str, Any]):\n",
        "def split_data(data: pd.DataFrame, split: dict[str, Any]):\n"
        "    raise RuntimeError(f\"token={split['api_token']} boom\")\n"))
    for extra in ([], ["-v"]):
        done = ws.kmrun("+experiment=baseline", "+params.split.api_token=tok-node-secret-31", *extra)
        assert done.code == 1 and "token=*** boom" in done.text, done.text
        assert "tok-node-secret-31" not in done.text
