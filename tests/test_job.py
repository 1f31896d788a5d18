from __future__ import annotations

import math

import pytest

from runner.errors import MetricError
from runner.metrics import objective_of, read_metrics
from runner.params import deep_merge
from runner.schema import KmrunConf, ObjectiveConf


@pytest.mark.parametrize(
    ("datasets", "names", "scalars", "series"),
    [
        ({"score": 0.5}, ["score"], {"score": 0.5}, {}),
        ({"m": {"acc": 0.9, "f1": 1}}, ["m"], {"acc": 0.9, "f1": 1.0}, {}),
        ({"curve": [0.1, 0.2]}, ["curve"], {}, {"curve": [0.1, 0.2]}),
        ({"m": {"loss": [3, 2], "acc": 0.7}}, ["m"], {"acc": 0.7}, {"loss": [3.0, 2.0]}),
        ({"m": {"name": "x", "ok": True}}, ["m"], {}, {}),
        ({"other": 1.0}, ["m"], {}, {}),
        # kedro-mlflow's shapes: MlflowMetricDataset, MlflowMetricsHistoryDataset, a history
        ({"r2": {"value": 0.38, "step": 0}}, ["r2"], {"r2": 0.38}, {}),
        ({"m": {"r2_score": {"value": 0.4, "step": 0}, "mae": {"value": 2}}}, ["m"], {"r2_score": 0.4, "mae": 2.0}, {}),
        ({"m": {"loss": [{"value": 2, "step": 1}, {"value": 3, "step": 0}]}}, ["m"], {}, {"loss": [3.0, 2.0]}),
        ({"m": {"value": "x", "step": 0}}, ["m"], {}, {}),
        # one pipeline under two namespaces: the shared keys keep their dataset's name
        ({"active.metrics": {"r2": 0.92, "mae": 1, "n": 3}, "candidate.metrics": {"r2": 0.90, "mae": 2}},
         ["active.metrics", "candidate.metrics"],
         {"active.metrics.r2": 0.92, "active.metrics.mae": 1.0, "n": 3.0, "candidate.metrics.r2": 0.90,
          "candidate.metrics.mae": 2.0}, {}),
    ],
)
def test_read_metrics(datasets, names, scalars, series):
    assert read_metrics(datasets, names) == (scalars, series)


def conf(metric, direction="maximize") -> KmrunConf:
    return KmrunConf(objective=ObjectiveConf(metric=metric, direction=direction))


def test_an_objective_two_datasets_hold_must_name_one():
    datasets = {"active.metrics": {"r2": 0.92}, "candidate.metrics": {"r2": 0.90}}
    c = KmrunConf(objective=ObjectiveConf(metric="r2"), metrics=list(datasets))
    scalars, series = read_metrics(datasets, c.metrics)
    with pytest.raises(MetricError, match="ambiguous.*active.metrics.r2, candidate.metrics.r2"):
        objective_of(c, scalars, series, datasets, [])
    c.objective.metric = "candidate.metrics.r2"
    assert objective_of(c, scalars, series, datasets, []) == 0.90


def test_objective_from_scalar_series_and_list():
    assert objective_of(conf("acc"), {"acc": 0.9}, {}, {}, []) == 0.9
    assert objective_of(conf("loss"), {}, {"loss": [3.0, 1.5]}, {}, []) == 1.5
    assert objective_of(conf(["acc", "loss"]), {"acc": 0.9}, {"loss": [1.0]}, {}, []) == [0.9, 1.0]
    assert objective_of(conf(None), {}, {}, {}, []) is None


def test_missing_objective_names_what_was_seen():
    with pytest.raises(MetricError) as info:
        objective_of(conf("acc"), {"accuracy": 0.9}, {}, {"metrics": {}}, ["model", "metrics"])
    text = str(info.value)
    assert "'acc' was not produced" in text and "accuracy" in text and "model, metrics" in text


def test_nan_objective_fails():
    with pytest.raises(MetricError, match="not a finite number"):
        objective_of(conf("acc"), {"acc": math.nan}, {}, {}, [])


def test_deep_merge_is_kedros_runtime_params_merge():
    base = {"model": {"C": 1.0, "max_iter": 10}, "l": [1, 2]}
    assert deep_merge(base, {"model": {"C": 2.0}, "l": [3]}) == {"model": {"C": 2.0, "max_iter": 10}, "l": [3]}
    assert base["model"]["C"] == 1.0
