"""The Ray executor's set-up errors, in this process (no cluster)."""

from __future__ import annotations

import sys

import pytest
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.schema import RayConf, parse


def test_without_ray_installed_the_message_says_what_to_install(monkeypatch):
    from runner import raycluster

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kmrun\[ray\]'"):
        raycluster.connect(RayConf(), {"mlflow.tracking_uri": "sqlite:///x.db"})


@pytest.mark.parametrize("key, value, message", [
    ("sweep.executor", "dask", "sweep.executor is 'dask'; use local or ray"),
    ("ray.resources", {"gpus": -1}, "ray.resources.gpus is -1"),
    ("ray.resources", {"cpus": "many"}, "ray.resources.cpus is 'many'"),
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
