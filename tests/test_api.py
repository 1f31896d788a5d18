"""The Python API, called many times in one process, as from a notebook."""

from __future__ import annotations

import pytest

import runner
from runner.errors import JobFailed, KmrunError, ParamError
from runner.records import Status


@pytest.mark.slow  # runs pipelines
def test_twenty_runs_in_one_process_log_what_kedro_ran_and_print_nothing(ws, monkeypatch, capfd):
    monkeypatch.chdir(ws.path)
    params = ws.path / "examples/digits/conf/base/parameters.yml"
    original = params.read_text()
    assert "test_size: 0.25" in original  # a parameter kmrun's own config does not set
    results = []
    for i in range(20):
        if i == 10:  # the user edits the project between two calls
            params.write_text(original.replace("test_size: 0.25", "test_size: 0.3"))
        results.append(runner.run(["+experiment=baseline", f"params.model.C={0.5 + i / 100}"]))
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    client = ws.client()
    logged = [client.get_run(r.run_id).data.params for r in results]
    assert [p["split.test_size"] for p in logged] == ["0.25"] * 10 + ["0.3"] * 10
    assert [p["model.C"] for p in logged] == [str(0.5 + i / 100) for i in range(20)]
    assert all(r.status is Status.FINISHED and r.objective == r.metrics["accuracy"] for r in results)
    assert ws.running() == 0


@pytest.mark.slow  # runs pipelines
def test_echo_prints_the_summary(ws, monkeypatch, capfd):
    monkeypatch.chdir(ws.path)
    result = runner.run(["+experiment=baseline"], echo=True)
    out, _ = capfd.readouterr()
    assert result.run_id in out and "mlflow ui" in out


@pytest.mark.slow  # runs pipelines
def test_errors_keep_their_type(ws, monkeypatch):
    monkeypatch.chdir(ws.path)
    with pytest.raises(ParamError, match="modle"):
        runner.run(["+experiment=baseline", "params.modle.C=0.5"])
    with pytest.raises(JobFailed, match="Unknown model.type 'svm'") as info:
        runner.run(["+experiment=baseline", "params.model.type=svm"])
    assert isinstance(info.value, KmrunError) and info.value.exit_code == 1
    with pytest.raises(runner.errors.MetricError, match="'auc' was not produced"):
        runner.run(["+experiment=baseline", "objective.metric=auc"])
    with pytest.raises(KmrunError, match="is a sweep: run it with kmrun -m"):
        runner.run(["+experiment=baseline", "params.model.C=0.1,1"])
    assert ws.running() == 0


@pytest.mark.slow  # runs pipelines
def test_sweep_returns_its_outcome_and_prints_nothing(ws, monkeypatch, capfd):
    monkeypatch.chdir(ws.path)
    outcome = runner.sweep(["+experiment=baseline", "params.model.C=0.1,1"])
    assert capfd.readouterr() == ("", "")
    assert outcome.kind == "grid" and outcome.exit_code == 0
    assert [o.status for o in outcome.outcomes] == [Status.FINISHED, Status.FINISHED]
    assert outcome.best().run_id == max(outcome.outcomes, key=lambda o: o.objective).run_id
    parent = ws.client().get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_finished"] == 2
    again = runner.sweep(["+experiment=baseline", "params.model.C=0.1,1"])
    assert [o.status for o in again.outcomes] == [Status.SKIPPED, Status.SKIPPED]
    assert again.notes == ["2 skipped (already FINISHED), 0 to run."] and again.parent_run_id == outcome.parent_run_id
