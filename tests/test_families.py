"""Studies beyond a flat space, end to end through the CLI: model families with their own
ranges (conditional spaces), constraints, and what the store already knows (warm start,
enqueue). Real Kedro runs, a real SQLite MLflow store and Optuna storage."""

from __future__ import annotations

import csv
import io
import math

import optuna
import pytest
from conftest import child_runs

pytestmark = pytest.mark.slow

FAMILIES = ["-m", "+experiment=baseline", "+study=families"]


def study_of(ws, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{ws.path / 'optuna.db'}")


def parent_of(ws, name):
    return next(r for r in ws.runs() if r.data.tags.get("kmrun.role") == "parent"
                and r.data.tags.get("optuna.study_name") == name)


def test_a_two_family_study_searches_each_familys_own_keys_and_reruns_its_winner_exactly(ws):
    done = ws.kmrun(*FAMILIES, "study.n_trials=8", "study.n_jobs=2", "study.export_best=families_best")
    assert done.code == 0, done.text
    study = study_of(ws, "families")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8
    own = {"logistic_regression": {"params.model.C"},
           "random_forest": {"params.model.n_estimators", "params.model.max_depth"}}
    for trial in complete:  # only the chosen family's keys, and the flat one
        assert set(trial.params) == {"model", "params.split.seed", *own[trial.params["model"]]}, trial.params
    assert {t.params["model"] for t in complete} == set(own)  # a best in each family
    assert "best of each option: model=logistic_regression" in done.out and "model=random_forest" in done.out
    runs = {r.info.run_id: r for r in child_runs(ws.runs())}
    for trial in complete:  # each run records the option it ran
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["kmrun.groups"] == f"model={trial.params['model']}"
        assert run.data.params["model.type"] == trial.params["model"]
    rows = list(csv.DictReader(io.StringIO(next(ws.path.glob("mlartifacts/*/*/artifacts/trials.csv")).read_text())))
    assert len(rows) == 8 and any(row["params_params.model.C"] == "" for row in rows)  # inactive: empty
    best = max(complete, key=lambda t: t.value)
    exported = (ws.path / "conf/experiment/families_best.yaml").read_text()
    assert f"override /model: {best.params['model']}" in exported
    again = ws.kmrun("+experiment=families_best", "cache=false")
    assert again.code == 0, again.text
    rerun = next(r for r in ws.runs() if (r.info.run_name or "").startswith("best of"))
    assert rerun.data.metrics["accuracy"] == best.value  # the winner, exactly
    assert rerun.data.tags["kmrun.groups"] == f"model={best.params['model']}"
    resumed = ws.kmrun(*FAMILIES, "study.n_trials=10")  # the same study, two more trials
    assert resumed.code == 0 and "8 trials already finished" in resumed.out, resumed.text
    assert len([t for t in study_of(ws, "families").trials if t.state.name == "COMPLETE"]) == 10
    promoted = ws.kmrun("promote", best.user_attrs["mlflow_run_id"], "--name", "promoted_best")
    assert promoted.code == 0 and f"override /model: {best.params['model']}" in (
        ws.path / "conf/experiment/promoted_best.yaml").read_text(), promoted.text


def test_a_constrained_study_never_reports_an_infeasible_best_and_kmrun_best_agrees(ws):
    rule = "accuracy <= 0.95"  # the best logistic regressions reach 0.96+: the rule decides
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=8", "study.sampler.name=random",
                    f"+objective.constraints=[{rule!r}]")
    assert done.code == 0, done.text
    study = study_of(ws, "tune")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    feasible = [t for t in complete if t.value <= 0.95]
    assert feasible and len(feasible) < len(complete), [t.value for t in complete]  # the rule bites both ways
    assert all(t.user_attrs["kmrun.constraints"] == [pytest.approx(t.value - 0.95)] for t in complete)
    parent = parent_of(ws, "tune")
    best_trial = int(parent.data.tags["optuna.best_trial"])
    assert best_trial == max(feasible, key=lambda t: t.value).number  # the best feasible, not the best
    assert parent.data.metrics["trials_infeasible"] == len(complete) - len(feasible)
    top = max(feasible, key=lambda t: t.value).user_attrs["mlflow_run_id"]
    # the rule lives in the sweep only (conf/kmrun.yaml has none): kmrun best ranks by what each run ran under
    for args in (("best",), ("best", "--sweep", parent.info.run_id)):
        shown = ws.kmrun(*args)
        assert shown.code == 0, shown.text
        assert f"best run {top}" in shown.out and "left out" in shown.out, shown.out


def test_a_constraint_on_a_metric_no_dataset_produces_stops_the_study_at_once(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=4",
                    "+objective.constraints=['model_size_mb <= 50']")
    assert done.code == 2, done.text
    assert "objective.constraints: 'model_size_mb <= 50' names the metric 'model_size_mb'" in done.text
    assert len(study_of(ws, "tune").trials) == 1 and ws.running() == 0


def test_a_grid_with_constraints_ranks_the_best_feasible_cell_first(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.01,1", "+objective.constraints=['accuracy <= 0.95']")
    assert done.code == 0, done.text
    parents, children = ws.family()
    low = next(c for c in children if c.data.params["model.C"] == "0.01")
    assert parents[0].data.tags["kmrun.best_run_id"] == low.info.run_id  # 1 scores higher but is infeasible
    assert parents[0].data.metrics["jobs_infeasible"] == 1 and "1 miss objective.constraints" in done.out


def test_a_warm_started_study_learns_from_the_grid_already_run_and_does_not_run_it_again(ws):
    grid = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")  # 10 cells
    assert grid.code == 0, grid.text
    # runs whose searched value fits, but which are other experiments: another family, another split
    for other in (("+experiment=forest", "params.model.C=0.55"), ("+experiment=baseline", "params.model.C=0.65",
                                                                   "params.split.test_size=0.3")):
        assert ws.kmrun(*other).code == 0
    space = "study.search_space={params.model.C: 'interval(0.01, 2)'}"
    tpe = "study.sampler={name: tpe, seed: 42, n_startup_trials: 10}"
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=12", "study.warm_start=true",
                    "~study.search_space", "+" + space, tpe, "+study.enqueue=[{params.model.C: 1.5}]")
    assert done.code == 0, done.text
    assert "Warm start: added 10 trials from finished runs" in done.out
    study = study_of(ws, "tune")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 12
    warm = [t for t in study.trials if "kmrun.warm_from" in t.user_attrs]
    assert len(warm) == 10 and sorted(t.params["params.model.C"] for t in warm) == pytest.approx(
        [0.1 * i for i in range(1, 11)])
    new = [t for t in study.trials if "kmrun.warm_from" not in t.user_attrs]
    assert new[0].params["params.model.C"] == 1.5  # the enqueued set first
    trial_runs = [r for r in ws.runs() if r.data.tags.get("kmrun.kind") == "trial"]
    assert len(trial_runs) == 2  # the added trials were not run again
    cold = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=42, n_startup_trials=10))
    first_cold = cold.ask({"params.model.C": optuna.distributions.FloatDistribution(0.01, 2)}).params["params.model.C"]
    assert not math.isclose(new[1].params["params.model.C"], first_cold)  # the sampler learnt from the 10
    assert parent_of(ws, "tune").data.metrics["trials_warm_started"] == 10
    best = study.best_trial  # exported as its params: a plain run of them gives its value
    rerun = ws.kmrun("+experiment=baseline", f"params.model.C={best.params['params.model.C']}", "cache=false",
                     "mlflow.experiment_name=rerun")
    assert rerun.code == 0, rerun.text
    client = ws.client()
    [again_run] = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert again_run.data.metrics["accuracy"] == pytest.approx(best.value)
    # other code: nothing of the store is learnt from
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace("    predicted = estimator.predict(X_test)\n",
                                               "    predicted = estimator.predict(X_test)\n    predicted = predicted[:]\n"))
    again = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.name=other", "study.n_trials=1",
                     "study.warm_start=true", "~study.search_space", "+" + space)
    assert again.code == 0 and "Warm start: no finished run in the store fits" in again.out, again.text


def test_two_processes_share_a_family_study_with_pruning_and_the_random_sampler(ws):
    """Define-by-run under what studies already do: a pruner stopping the SGD family's
    epochs, a sampler other than TPE, and two kmrun processes on one study."""
    import os
    import subprocess
    import sys

    from conftest import eventually

    (ws.path / "conf/study/fam_prune.yaml").write_text(
        "# @package _global_\nstudy:\n  n_trials: 8\n  sampler: {name: random, seed: 3}\n"
        "  pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 2}\n  search_space:\n    model:\n"
        "      sgd:\n        params.model.alpha: tag(log, interval(1e-6, 1.0))\n"
        "      logistic_regression:\n        params.model.C: tag(log, interval(1e-3, 10))\n")
    args = ["-m", "+experiment=baseline", "+study=fam_prune"]
    first = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    assert eventually(lambda: ws.running() >= 2, 120), "the first process ran no trial"
    second = ws.kmrun(*args)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0 and second.code == 0, out[-3000:] + second.text[-3000:]
    trials = study_of(ws, "fam_prune").trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 8 and len({t.number for t in trials}) == len(trials)
    for trial in done:
        keys = {"sgd": {"params.model.alpha"}, "logistic_regression": {"params.model.C"}}[trial.params["model"]]
        assert set(trial.params) == {"model", *keys}, trial.params
    sgd = [t for t in done if t.params["model"] == "sgd"]
    assert sgd and all(t.intermediate_values for t in sgd)  # the SGD family reported its epochs to its trial
    assert ws.running() == 0
