"""Outcomes, counts, ranking and exit codes: the plain records every layer reads."""

from __future__ import annotations

import pytest

from runner.errors import MetricError
from runner.records import BestTrial, JobResult, Objective, Outcome, Status, StudySummary, SweepOutcome, counts


def outcome(index, status, objective=None):
    return Outcome(index, [f"params.model.C={index}"], status, f"r{index}", {"acc": objective or 0}, objective)


def sweep(*outcomes, direction="maximize"):
    return SweepOutcome("grid", list(outcomes), Objective(["acc"], [direction]), "p", "kmrun -m x", "sqlite:///x")


def test_ranked_best_first_by_direction_and_unscored_last():
    jobs = [outcome(0, Status.FINISHED, 0.5), outcome(1, Status.FAILED), outcome(2, Status.SKIPPED, 0.9),
            outcome(3, Status.FINISHED, 0.7)]
    assert [o.index for o in sweep(*jobs).ranked()] == [2, 3, 0, 1]
    assert [o.index for o in sweep(*jobs, direction="minimize").ranked()] == [0, 3, 2, 1]
    assert sweep(*jobs).best().index == 2
    assert sweep(outcome(0, Status.FAILED)).best() is None


def test_counts_and_exit_codes():
    jobs = [outcome(0, Status.FINISHED, 1), outcome(1, Status.SKIPPED, 1), outcome(2, Status.KILLED),
            outcome(3, Status.NOT_STARTED), outcome(4, Status.FAILED), outcome(5, Status.PRUNED)]
    assert counts(jobs) == {"jobs_total": 6, "jobs_finished": 2, "jobs_failed": 1, "jobs_killed": 1,
                            "jobs_pruned": 1, "jobs_skipped": 1, "jobs_not_started": 1}
    assert sweep(*jobs).exit_code == 1
    assert sweep(*jobs[:2]).exit_code == 0
    done = sweep(outcome(0, Status.FAILED))
    done.study = StudySummary("s", "x", "x", 2, {"COMPLETE": 2, "FAIL": 1}, [BestTrial(0, [1.0], {}, "r")], "", "TPE")
    assert done.exit_code == 0  # a study is judged by whether it holds its target
    done.study.states = {"COMPLETE": 1}
    assert done.exit_code == 1


def test_outcome_label_values_and_take():
    job = Outcome(0, ["params.model.C=0.1", "+params.seed=2"])
    assert job.label == "C=0.1 seed=2" and job.values == {"params.model.C": "0.1", "params.seed": "2"}
    job.take(JobResult("r", Status.FAILED, {"acc": 0.1}, None, MetricError("no acc")))
    assert (job.status, job.run_id, job.error, job.score()) == (Status.FAILED, "r", "no acc", None)
    assert Status.PRUNED.run_status == "KILLED" and Status.FINISHED.run_status == "FINISHED"


def runs_rows(n=3):
    rows = []
    for i in range(n):
        rows.append({"run_id": f"{i:032x}", "name": f"C={i}", "status": "FINISHED", "start": "2026-11-27T00:02:0{i}",
                     "duration_s": 0.5, "parent_run_id": None, "objective": 0.9 + i / 100,
                     "metrics": {"accuracy": 0.9 + i / 100, "f1_macro": 0.8},
                     "params": {"model.C": str(i), "model.long": "x" * 200, "empty": ""}})
    return rows


def test_the_runs_table_shows_the_params_that_differ_at_80_columns_with_headers_cut_from_the_left(capsys):
    from runner.terminal import print_runs

    rows = runs_rows()
    for i, row in enumerate(rows):
        row["name"] = f"a fairly long run name {i}"
        row["params"] = {"split.test_size": f"0.{i + 1}", "model.C": "1", "best.model.C": "5" if i == 0 else ""}
    print_runs(rows, "table", "accuracy", width=80)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["name", "accuracy", "…test_size"], lines[1]
    assert "0.1" in lines[2] and all(len(line) <= 80 for line in lines)


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_runs_table_fits_the_width_truncates_and_has_no_empty_column(width, capsys):
    from runner.terminal import print_runs

    print_runs(runs_rows(), "table", "accuracy", width=width)
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= width for line in lines), [len(line) for line in lines]
    header = lines[1].split()
    assert header[:3] == ["name", "accuracy", "model.C"] and "empty" not in header  # what differs comes first
    assert header[3:6] == ["status", "start", "duration"] or width < 120
    if width >= 120:
        assert "x" * 23 + "…" in lines[2] and "x" * 25 not in lines[2]  # a long value is cut
    else:
        assert "did not fit" in lines[-1]


def test_the_runs_table_takes_chosen_columns(capsys):
    from runner.terminal import print_runs

    print_runs(runs_rows(), "table", "accuracy", columns=["name", "params.model.C", "metrics.f1_macro"], width=80)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["name", "model.C", "f1_macro"] and lines[2].split() == ["C=0", "0", "0.8"]
    with pytest.raises(ValueError, match="no column nope"):
        print_runs(runs_rows(), "table", "accuracy", columns=["nope"])


def test_a_markdown_table_escapes_pipes_and_line_breaks():
    from runner.results import to_markdown

    text = to_markdown([{"a|b": "x|y", "note": "one\ntwo"}])
    assert text.splitlines() == ["| a\\|b | note |", "|---|---|", "| x\\|y | one<br>two |"]


def test_piped_output_is_not_cut_at_80_columns(monkeypatch):
    import io

    from rich.console import Console

    from runner import terminal

    monkeypatch.delenv("COLUMNS", raising=False)
    piped = io.StringIO()
    monkeypatch.setattr(terminal, "console", terminal._console(stderr=False))
    monkeypatch.setattr(terminal.console, "file", piped)
    line = "Serving runs:/" + "0" * 32 + "/model on http://127.0.0.1:5001/invocations (Ctrl-C stops it)"
    terminal.say(line)
    assert piped.getvalue() == line + "\n"
    assert isinstance(terminal.console, Console) and terminal.console.width == 120


def test_the_cache_listing_aligns_long_node_names(capsys):
    from runner import terminal

    terminal.cache_table([("a_very_long_node_name_of_a_namespaced_pipeline", "1.0 KB", "2026-11-29T05:09:35", "run1", "k1"),
                          ("load", "12345.5 KB", "2026-11-29T05:09:36", "run2", "k2")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    ends = {line.index("KB") for line in lines[1:]}
    starts = {line.index("2026") for line in lines[1:]}
    assert len(ends) == 1 and len(starts) == 1, lines  # one column each, whatever the name's length
