"""Optuna studies end to end through the CLI, with the default SQLite storages."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from conftest import eventually

pytestmark = pytest.mark.slow


def study_of(ws, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{ws.path / 'optuna.db'}")


def test_a_seeded_tpe_study_records_parent_children_plots_and_a_rerunnable_best(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.export_best=best_of_tune")
    assert done.code == 0, done.text
    parents, children = ws.family("trial")
    assert len(parents) == 1 and len(children) == 10
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(10))
    assert all(c.data.tags["optuna.sampler"] == "TPESampler" and "FloatDistribution" in c.data.tags["optuna.distributions"] for c in children)
    study = study_of(ws, "tune")
    parent = parents[0]
    assert parent.data.metrics["best_accuracy"] == study.best_value
    assert parent.data.tags["kmrun.best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.params["best.params.model.C"] == str(study.best_params["params.model.C"])
    client = ws.client()
    names = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"trials.csv", "best_experiment.yaml", "plots/study.html", "plots/optimization_history.png",
            "plots/param_importances.png", "plots/parallel_coordinate.png", "plots/slice.png"} <= names
    assert "plots/intermediate_values.png" not in names  # no trial reported a step: no empty plot
    assert "Rerun the best trial: kmrun +experiment=best_of_tune" in done.out
    exported = ws.path / "conf/experiment/best_of_tune.yaml"
    assert exported.read_text() == open(client.download_artifacts(parent.info.run_id, "best_experiment.yaml", str(ws.path))).read()

    rerun = ws.kmrun("+experiment=best_of_tune")
    assert rerun.code == 0, rerun.text
    newest = max(ws.runs(), key=lambda r: r.info.start_time)
    assert newest.data.metrics["accuracy"] == study.best_value


def test_pruned_trials_are_killed_with_their_steps(ws):
    done = ws.kmrun("-m", "+study=prune")
    assert done.code == 0, done.text
    study = study_of(ws, "prune")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and len(pruned) + len(complete) == 12
    client = ws.client()
    for trial in pruned:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED"
        steps = client.get_metric_history(run.info.run_id, "intermediate")
        assert 0 < len(steps) < 20  # the full run takes 20 epochs
        assert [s.step for s in steps] == sorted(s.step for s in steps)
    full = client.get_metric_history(complete[0].user_attrs["mlflow_run_id"], "intermediate")
    assert len(full) == 20


def test_kill_9_mid_trial_then_rerun_completes_without_duplicates(ws):
    args = ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=6",
            "params.model.max_iter=5000", "params.model.C=tag(log, interval(100, 1000))"]
    env = {"KEDRO_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**__import__("os").environ, **env})
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline, "no trial was running after one completed within 120 s"
        time.sleep(0.3)
        try:
            with sqlite3.connect(ws.path / "optuna.db") as con:
                running = con.execute("select count(*) from trials where state='RUNNING'").fetchone()[0]
                done = con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
        except sqlite3.Error:
            continue
        if running and done >= 1:
            break
    assert proc.poll() is None, "the study ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ws.running() >= 1  # the kill left a run RUNNING ...

    again = ws.kmrun(*args)
    assert again.code == 0, again.text
    study = study_of(ws, "tune")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert optuna.trial.TrialState.RUNNING not in states
    assert len({t.number for t in study.trials}) == len(study.trials)
    finished = [c for c in ws.family("trial")[1] if c.info.status == "FINISHED"]
    complete_runs = {t.user_attrs["mlflow_run_id"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert {c.info.run_id for c in finished} == complete_runs and len(finished) == 6
    assert ws.running() == 0  # ... and the rerun cleaned it up


def test_two_processes_share_one_study(ws):
    # trials of about a second (random forests), so that the second process, started once
    # the first runs its first trial, finds work left even on a loaded machine
    args = ["-m", "+experiment=forest", "+study=tune", "study.n_trials=8", "params.model.n_estimators=500"]
    import os

    first = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=ws.path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    assert eventually(lambda: ws.running() >= 2, 120), "the first process ran no trial"  # its parent and a trial
    second = ws.kmrun(*args)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert second.code == 0, second.text
    study = study_of(ws, "tune")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 8 and len({t.number for t in study.trials}) == len(study.trials)
    children = [c for c in ws.family("trial")[1] if c.info.status == "FINISHED"]
    assert len(children) == 8 and ws.running() == 0
    owners = {t.user_attrs["kmrun.owner"] for t in finished}
    assert len(owners) == 2, owners  # both processes ran trials


def test_multi_objective_gives_a_pareto_set(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=6", "study.name=mo",
                    "objective.metric=[accuracy,f1_macro]", "objective.direction=[maximize,maximize]")
    assert done.code == 0, done.text
    assert "Pareto set of study 'mo'" in done.out
    parents, _ = ws.family("trial")
    tags = parents[0].data.tags
    study = study_of(ws, "mo")
    assert tags["optuna.pareto_trials"] == ",".join(str(t.number) for t in study.best_trials)
    plots = {a.path for a in ws.client().list_artifacts(parents[0].info.run_id, "plots")}
    assert "plots/pareto_front.png" in plots and "plots/study.html" in plots


def test_pruning_works_in_parallel_workers(ws):
    done = ws.kmrun("-m", "+study=prune", "study.n_jobs=2", "study.name=prune2")
    assert done.code == 0, done.text
    study = study_of(ws, "prune2")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 12
    for trial in study.trials:
        run = ws.client().get_run(trial.user_attrs["mlflow_run_id"])
        expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        assert run.info.status == expected
        assert len(ws.client().get_metric_history(run.info.run_id, "intermediate")) == len(trial.intermediate_values)
    assert ws.running() == 0


def test_a_study_resumed_on_changed_code_reports_only_the_trials_of_that_code(ws):
    study = ["-m", "+experiment=baseline", "+study=tune", "study.n_trials=3"]
    assert ws.kmrun(*study).code == 0
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace("/ 16.0", "* 0.0"))  # every trial now worse than the old ones
    done = ws.kmrun("-m", "+experiment=baseline", "+study=tune", "study.n_trials=5")
    assert done.code == 0, done.text
    assert "the best this run reports is of trials 3 on" in " ".join(done.out.split())
    parents, children = ws.family("trial")
    second = max(parents, key=lambda p: p.info.start_time)
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == second.info.run_id]
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in mine) == [3, 4]
    top = max(c.data.metrics["accuracy"] for c in mine)  # below every old trial's: the old best would show
    assert top < min(c.data.metrics["accuracy"] for c in children if c not in mine)
    assert second.data.tags["kmrun.study.version_from"] == "3" and second.data.metrics["best_accuracy"] == top
    assert second.data.tags["kmrun.best_run_id"] in {c.info.run_id for c in mine if c.data.metrics["accuracy"] == top}
