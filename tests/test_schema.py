from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.schema import parse


def test_defaults_and_params_pass_through():
    conf = parse(OmegaConf.create({"params": {"model": {"C": 1}}, "hydra": {"anything": 1}}))
    assert conf.params == {"model": {"C": 1}}
    assert conf.kedro.pipeline == "__default__" and conf.metrics == ["metrics"]
    assert conf.mlflow.tracking_uri is None and conf.objective.direction == "maximize"


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        ({"parms": {}}, "Unknown key 'parms' in kmrun's config. Did you mean 'params'?"),
        ({"mlflow": {"trackin_uri": "x"}}, "Did you mean 'tracking_uri'?"),
        ({"kedro": {"pipline": "x"}}, "Unknown key 'kedro.pipline' in 'kedro'. Did you mean 'pipeline'?"),
        ({"objective": {"metrc": "a"}}, "Did you mean 'metric'?"),
        ({"sweep": {"n_job": 2}}, "Did you mean 'n_jobs'?"),
        ({"sweep": {"n_jobs": "two"}}, "Config key 'sweep.n_jobs' has a value of the wrong type"),
        ({"kedro": {"tags": 3}}, "Config key 'kedro.tags' has a value of the wrong type"),
        ({"objective": {"direction": "up"}}, "objective.direction is 'up'; use one of: minimize, maximize"),
        ({"objective": {"metric": ["a", "b"], "direction": ["max"]}}, "use one of"),
        (
            {"objective": {"metric": ["a", "b"], "direction": ["maximize", "minimize", "maximize"]}},
            "names 2 metric(s) but objective.direction gives 3",
        ),
    ],
)
def test_bad_config_is_named(cfg, fragment):
    with pytest.raises(ConfigError) as info:
        parse(OmegaConf.create(cfg))
    assert fragment in str(info.value)


def test_one_direction_applies_to_every_metric():
    conf = parse(OmegaConf.create({"objective": {"metric": ["a", "b"], "direction": "minimize"}}))
    assert conf.objective.direction == ["minimize", "minimize"]
