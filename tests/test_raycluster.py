"""The Ray executor's set-up errors, in this process (no cluster)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.redact import Redactor
from runner.schema import RayConf, parse


def test_without_ray_installed_the_message_says_what_to_install(monkeypatch):
    from runner import raycluster

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kmrun\[ray\]'"):
        raycluster.connect(RayConf(), {"mlflow.tracking_uri": "sqlite:///x.db"}, ".", Redactor(), Path.cwd())


@pytest.mark.parametrize("key, value, message", [
    ("sweep.executor", "dask", "sweep.executor is 'dask'; use local or ray"),
    ("ray.resources", {"gpus": -1}, "ray.resources.gpus is -1"),
    ("ray.resources", {"cpus": "many"}, "ray.resources.cpus is 'many'"),
    ("ray.runtime_env", {"env_vars": {"DB_PASSWORD": "x"}}, "ray.runtime_env.env_vars.DB_PASSWORD looks secret"),
    ("ray.runtime_env", {"env_vars": ["A=1"]}, "env_vars is a mapping"),
])
def test_bad_executor_settings_name_the_key(key, value, message):
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=message):
        parse(cfg)


@pytest.mark.slow  # a process
def test_importing_kmrun_does_not_import_ray():
    import subprocess

    code = "import sys, runner, runner.api, runner.scheduler; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_job_spec_travels_to_a_ray_node_without_secrets_and_the_node_hides_them_again(ws, monkeypatch):
    """A Ray task's arguments are kept by Ray (its object store, spilled to disk): the spec
    goes without the redactor (which holds every secret) and with its config redacted; the
    node builds its own redactor from the project's credentials and its environment."""
    import pickle

    from runner.compose import Composer
    from runner.job import prepare
    from runner.raycluster import arrived, shipped

    credential, token, password = "cred-s3cret-value-123", "env-s3cret-value-456", "pw-s3cret-789"
    (ws.path / "examples/digits/conf/local/credentials.yml").write_text(f"db:\n  con: {credential}\n")
    monkeypatch.setenv("KMRUN_TEST_API_TOKEN", token)
    monkeypatch.chdir(ws.path)
    overrides = ["+experiment=baseline", f"+mlflow.tags.origin=postgresql://u:{password}@db.example/x"]
    with Composer() as composer:
        spec = prepare(composer.compose(overrides), overrides, open_store=False)
    assert {credential, token, password} <= set(spec.redact.values)
    travelled = pickle.dumps(shipped(spec))
    for secret in (credential, token, password):
        assert secret.encode() not in travelled, secret
    on_node = arrived(pickle.loads(travelled))
    assert {credential, token} <= set(on_node.redact.values)
    assert on_node.conf.mlflow.tags["origin"] == "postgresql://u:***@db.example/x"  # the run's tag, hidden already
    assert on_node.params == spec.params and on_node.config_hash == spec.config_hash


def test_a_shipped_working_dir_holds_the_project_and_leaves_secrets_and_stores_behind(tmp_path):
    from runner.raycluster import NOT_SHIPPED, shipping

    project = tmp_path / "repo" / "project"
    project.mkdir(parents=True)
    store = {"mlflow.tracking_uri": f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"}
    settings = RayConf(runtime_env={"working_dir": "repo", "excludes": ["data/big/"]})
    env = shipping(settings, str(project), Redactor(), tmp_path, store).runtime_env
    assert env["working_dir"] == str(tmp_path / "repo")
    assert env["excludes"] == ["data/big/", *NOT_SHIPPED, "/mlflow.db"]
    assert {"**/credentials*", "**/conf/local/"} <= set(env["excludes"])
    with pytest.raises(ConfigError, match="does not hold the Kedro project"):
        shipping(RayConf(runtime_env={"working_dir": "repo/project"}), str(tmp_path / "other"), Redactor(),
                 tmp_path, {})
    with pytest.raises(ConfigError, match="is not a folder"):
        shipping(RayConf(runtime_env={"working_dir": "nowhere"}), str(project), Redactor(), tmp_path, {})
    with pytest.raises(ConfigError, match="env_vars.TEAM holds a secret"):
        shipping(RayConf(runtime_env={"env_vars": {"TEAM": "pw-s3cret-789"}}), str(project),
                 Redactor(["pw-s3cret-789"]), tmp_path, {})


def test_a_spec_bound_for_a_shipped_project_points_into_it(ws, monkeypatch):
    from runner.compose import Composer
    from runner.job import prepare
    from runner.raycluster import relocated

    monkeypatch.chdir(ws.path)
    with Composer() as composer:
        spec = prepare(composer.compose(["+experiment=baseline"]), ["+experiment=baseline"], open_store=False)
    assert relocated(spec, None) is spec
    moved = relocated(spec, str(ws.path))
    assert moved.conf.kedro.project_path == "examples/digits"
    assert moved.conf.cache.dir == str(ws.path / "kmrun-cache")  # the driver's, beside its store


def test_local_jobs_that_ask_for_gpus_get_their_own(monkeypatch):
    from runner.scheduler import gpu_slots, visible_gpus

    assert gpu_slots(["0", "1"], 1) == ["0", "1"]
    assert gpu_slots(["0", "1"], 0.5) == ["0", "0", "1", "1"]
    assert gpu_slots(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert gpu_slots(["0", "1", "2"], 2) == ["0,1"]
    assert gpu_slots(["0"], 2) == [] and gpu_slots([], 1) == [] and gpu_slots(["0"], 0) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
