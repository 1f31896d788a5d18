from __future__ import annotations

from pathlib import Path

import pytest

from runner.redact import MAX_PARAM_VALUE, REDACTED, Redactor, flatten, is_secret_name
from runner.tracking import Tracker, resolve_uri


@pytest.mark.parametrize(
    ("tree", "flat"),
    [
        ({"a": 1}, {"a": 1}),
        ({"model": {"C": 1.0, "kw": {"x": None}}}, {"model.C": 1.0, "model.kw.x": None}),
        ({"l": [1, {"x": 2}]}, {"l": [1, {"x": 2}]}),
        ({"empty": {}}, {"empty": {}}),
    ],
)
def test_flatten(tree, flat):
    assert flatten(tree) == flat


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("db_password", True),
        ("api.token", True),
        ("API_KEY", True),
        ("aws_secret_access_key", True),
        ("model.C", False),
        ("split.seed", False),
        ("tokenizer_name", False),
        ("tokenizer.max_tokens", False),
        ("num_tokens", False),
        ("TOKENIZERS_PARALLELISM", False),
        ("api_tokens", True),
        ("service.apiKey", True),
        ("db_pin_secret", True),
        ("client_secret", True),
        ("passport_id", False),
        ("bypass", False),
    ],
)
def test_is_secret_name(key, secret):
    assert is_secret_name(key) is secret


def test_redactor_hides_secret_keys_credential_values_and_env_secrets(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "env-token-123")
    red = Redactor.for_project(
        credentials={"db": {"user": "admin", "pass": "s3cr3t-cred"}},
        params={"db_password": "hunter22", "model": {"C": 1.0}},
    )
    params = red.params(flatten({"db_password": "hunter22", "url": "postgres://u:s3cr3t-cred@h", "model": {"C": 1.0}}))
    assert params == {"db_password": REDACTED, "url": f"postgres://u:{REDACTED}@h", "model.C": "1.0"}
    assert red.text("token is env-token-123 and hunter22") == f"token is {REDACTED} and {REDACTED}"
    tree = red.tree({"params": {"api_token": "abc", "n": 3, "s": "x s3cr3t-cred"}})
    assert tree == {"params": {"api_token": REDACTED, "n": 3, "s": f"x {REDACTED}"}}


def test_long_param_values_are_cut_to_mlflows_limit():
    out = Redactor().params({"long": "x" * 10_000})
    assert len(out["long"]) == MAX_PARAM_VALUE and out["long"].endswith("config.yaml artifact]")


def test_resolve_uri_prefers_config_then_env_then_embedded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_uri(None) == "sqlite:///elsewhere.db"
    assert resolve_uri("http://x:5000") == "http://x:5000"


def test_tracker_sends_hundreds_of_params_and_steps_in_batches(tmp_path, template_store):
    import shutil

    shutil.copy(template_store, tmp_path / "mlflow.db")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "batching")
    run_id = tracker.start("r", {"t": "1"})
    params = {f"p{i:03d}": str(i) for i in range(250)}
    tracker.log(run_id, params=params, metrics={"m": 1.0}, series={"curve": [0.1, 0.2, 0.3]})
    tracker.finish(run_id, "FINISHED")
    run = tracker.client.get_run(run_id)
    assert run.data.params == params
    assert run.data.metrics == {"m": 1.0, "curve": 0.3}
    history = tracker.client.get_metric_history(run_id, "curve")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert run.info.status == "FINISHED"
    assert tracker.client.get_experiment(tracker.experiment_id).artifact_location.startswith(
        (tmp_path / "mlartifacts").as_uri()
    )


def test_redactor_takes_numbers_lists_and_url_passwords_but_not_common_values(monkeypatch):
    monkeypatch.setenv("MY_FLAG_TOKEN", "false")
    red = Redactor.for_project(
        credentials={"db": {"port": 5432, "hosts": ["db-host-1", "db-host-2"]}},
        params={"pin_secret": 98765432, "api_tokens": ["tokA1", "tokB2"], "debug": False},
        urls=["postgresql://u:pg-pass-9@h/db", None, "sqlite:///x.db"],
    )
    text = "98765432 tokA1 tokB2 db-host-1 5432 pg-pass-9 false true"
    assert red.text(text) == "*** *** *** *** *** *** false true"
    assert red.override("params.db_password=ab") == "params.db_password=***"
    assert red.override("params.model.C=0.1") == "params.model.C=0.1"
    both = Redactor.union([Redactor(["aaaa1"]), Redactor(["bbbb2"])])
    assert both.text("aaaa1,bbbb2") == "***,***"


def test_text_artifacts_land_where_mlflow_puts_them_with_or_without_the_shortcut(tmp_path, template_store):
    """``log_texts`` writes a local run's files itself; MLflow must find them as its own."""
    import shutil

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    folder = tmp_path / "a folder with spaces"
    folder.mkdir()
    shutil.copy(template_store, folder / "mlflow.db")
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}", "texts")
    files = {"config.yaml": "params:\n  C: 0.5\n", "overrides.txt": "params.model.C=0.5\n"}
    ours = tracker.start("ours", {})
    other = Tracker(f"sqlite:///{folder / 'mlflow.db'}", "texts")  # did not start it: goes through MLflow
    for n, (store, run_id) in enumerate(((tracker, ours), (other, ours), (other, other.start("theirs", {})))):
        store.log_texts(run_id, files)
        assert {a.path for a in store.client.list_artifacts(run_id)} == set(files)
        for name, text in files.items():
            (tmp_path / str(n)).mkdir(exist_ok=True)
            # through the run's artifact URI (MLflow 3.0 reads runs:/ URIs from the default store)
            repository = get_artifact_repository(store.client.get_run(run_id).info.artifact_uri)
            assert Path(repository.download_artifacts(name, str(tmp_path / str(n)))).read_text() == text
    assert ours in tracker._local_artifacts and ours not in other._local_artifacts


NAMES = ["accuracy", "model.C", "a/b", "a b", "a:b", "a-b_c.d", "", ".", "..", "../a", "a/../b", "./a", "/a", "a/",
         "a//b", "a\\b", "a!b", "a=b", "é", "数", "a\tb", "a\nb", "a,b", "params:x", "x..y", "a/./b", "$x", "a%b"]


def test_kmruns_name_rule_is_mlflows():
    """kmrun checks names without importing MLflow; MLflow's own rule must agree on every one."""
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    from runner.tracking import rejected_names

    mlflows = [n for n in NAMES if not validate_param_and_metric_name(n) or path_not_unique(n)]
    assert rejected_names(NAMES) == mlflows
    assert {"a!b", "..", "a//b", "/a"} <= set(mlflows) and "model.C" not in mlflows  # the list tests both ways
