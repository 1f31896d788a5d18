"""Grid sweeps end to end through the CLI, against a real SQLite store."""

from __future__ import annotations

import pickle

import pytest

pytestmark = pytest.mark.slow

GRID = ["+experiment=baseline", "params.model.C=0.01,0.1,1", "params.split.seed=range(0,3)"]


def test_a_3x3_grid_is_one_parent_and_nine_finished_children(ws):
    done = ws.kmrun("-m", *GRID)
    assert done.code == 0, done.text
    parents, children = ws.family()
    assert len(parents) == 1 and len(children) == 9
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    cells = {(c.data.params["model.C"], c.data.params["split.seed"]) for c in children}
    assert cells == {(C, s) for C in ("0.01", "0.1", "1.0") for s in ("0", "1", "2")}
    for child in children:
        assert f"params.model.C={child.data.params['model.C'].removesuffix('.0')}" in child.data.tags["kmrun.overrides"]
    metrics = parent.data.metrics
    assert metrics["jobs_total"] == 9 and metrics["jobs_finished"] == 9 and metrics["jobs_failed"] == 0
    best = max(children, key=lambda c: c.data.metrics["accuracy"])
    assert metrics["best_accuracy"] == best.data.metrics["accuracy"]
    assert parent.data.tags["kmrun.best_run_id"] == best.info.run_id
    assert parent.data.params["best.params.model.C"] in ("0.01", "0.1", "1")
    artifacts = {a.path for a in ws.client().list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "objective_by_param.png", "sweep.txt"} <= artifacts
    csv_path = ws.client().download_artifacts(parent.info.run_id, "results.csv", str(ws.path))
    lines = open(csv_path).read().splitlines()
    assert len(lines) == 10 and best.info.run_id in lines[1]  # sorted, best first
    assert "Sweep results, best first" in done.out
    assert ws.running() == 0


def test_a_failing_cell_fails_alone_and_a_rerun_runs_only_it(ws):
    # The same code in both runs (a code change would rerun every cell): the failure comes
    # and goes with an environment variable, as a flaky resource would.
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace(
        '    kind = model["type"]\n',
        '    kind = model["type"]\n    if str(model["C"]) == __import__("os").environ.get("KMRUN_TEST_BOOM"):\n'
        '        raise RuntimeError("boom at C=0.1")\n',
    ))
    args = ["-m", "+experiment=baseline", "params.model.C=0.01,0.1,1"]
    done = ws.kmrun(*args, env={"KMRUN_TEST_BOOM": "0.1"})
    assert done.code == 1, done.text
    assert "boom at C=0.1" in done.err and "kmrun -m +experiment=baseline params.model.C=0.01,0.1,1" in done.err
    parents, children = ws.family()
    by_status = sorted((c.data.params["model.C"], c.info.status) for c in children)
    assert by_status == [("0.01", "FINISHED"), ("0.1", "FAILED"), ("1.0", "FINISHED")]
    failed = next(c for c in children if c.info.status == "FAILED")
    tb = ws.client().download_artifacts(failed.info.run_id, "traceback.txt", str(ws.path))
    assert "RuntimeError: boom at C=0.1" in open(tb).read()
    assert parents[0].info.status == "FAILED"

    done = ws.kmrun(*args)
    assert done.code == 0, done.text
    assert "2 skipped (already FINISHED), 1 to run." in done.out
    parents, children = ws.family()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same sweep, resumed
    finished = [c.data.params["model.C"] for c in children if c.info.status == "FINISHED"]
    assert sorted(finished) == ["0.01", "0.1", "1.0"]  # no duplicates
    assert ws.running() == 0

    done = ws.kmrun(*args, "sweep.rerun=true")
    assert done.code == 0, done.text
    parents, children = ws.family()
    assert len(parents) == 2 and len([c for c in children if c.info.status == "FINISHED"]) == 6


def test_two_parallel_workers_keep_outputs_and_runs_apart(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.01,0.1,1,10", "sweep.n_jobs=2")
    assert done.code == 0, done.text
    _, children = ws.family()
    assert len(children) == 4
    paths = set()
    for child in children:
        files = list(ws.path.glob(f"multirun/*/*/{child.data.tags['kmrun.cell']}/data/06_models/model.pkl"))
        assert len(files) == 1
        model = pickle.loads(files[0].read_bytes())
        assert float(child.data.params["model.C"]) == model.C
        paths.add(files[0])
        assert set(child.data.metrics) == {"accuracy", "f1_macro", "training_curve"}
        history = ws.client().get_metric_history(child.info.run_id, "accuracy")
        assert len(history) == 1
    assert len(paths) == 4
    assert not (ws.path / "examples/digits/data/06_models/model.pkl").exists()  # the project's own file is untouched


def test_dry_run_creates_nothing(ws):
    (ws.path / "mlflow.db").unlink()
    done = ws.kmrun("-m", *GRID, "sweep.dry_run=true")
    assert done.code == 0, done.text
    assert "Dry run: 9 job(s)" in done.out
    assert not (ws.path / "mlflow.db").exists() and not (ws.path / "multirun").exists()


def test_the_yaml_sweep_file_runs_its_grid(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "+sweep=c_grid", "params.split.seed=0")
    assert done.code == 0, done.text
    _, children = ws.family()
    assert sorted(c.data.params["model.C"] for c in children) == ["0.01", "0.1", "1.0"]
    assert {c.data.params["split.seed"] for c in children} == {"0"}  # the CLI wins over the file


def test_every_bad_sweep_key_is_listed_once(ws):
    done = ws.kmrun("-m", "+experiment=baseline", "params.modle.C=1,2", "params.split.sed=1,2")
    assert done.code == 2, done.text
    assert ws.runs() == []  # checked before anything was recorded
    assert done.err.count("params.modle (") == 1 and done.err.count("params.split.sed (") == 1


def test_max_failures_stops_launching_and_reports_the_jobs_never_started(ws):
    done = ws.kmrun(
        "-m", "+experiment=baseline", "params.model.type=svm,knn,logistic_regression", "sweep.max_failures=1"
    )
    assert done.code == 1, done.text
    parents, children = ws.family()
    assert [c.info.status for c in children] == ["FAILED"]  # the first cell failed; nothing else started
    assert parents[0].data.metrics["jobs_not_started"] == 2 and parents[0].info.status == "FAILED"
    assert "2 not started" in done.out


MINIMAL = """\
kedro:
  project_path: examples/digits
objective:
  metric: accuracy
metrics: [metrics]
"""


def test_a_hand_written_config_with_only_kmruns_keys_runs_a_grid_and_a_study(ws):
    (ws.path / "conf/kmrun.yaml").write_text(MINIMAL)
    done = ws.kmrun("-m", "params.model.C=0.1,1")
    assert done.code == 0, done.text
    parents, children = ws.family()
    assert len(parents) == 1 and sorted(c.data.params["model.C"] for c in children) == ["0.1", "1.0"]
    done = ws.kmrun("-m", "study.n_trials=3", "params.model.C=interval(0.1,1)")
    assert done.code == 0, done.text
    parents, trials = ws.family("trial")
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    assert all(0.1 <= float(t.data.params["model.C"]) <= 1 for t in trials)
    assert not (ws.path / "outputs").exists() and not list(ws.path.rglob(".hydra"))  # Hydra wrote nothing
    assert ws.running() == 0


def test_a_grid_resumed_after_a_code_change_reruns_its_cells(ws):
    args = ["-m", "+experiment=baseline", "params.model.C=0.1,1"]
    assert ws.kmrun(*args).code == 0
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text() + "\n# a comment changes no result\n")
    assert "2 skipped (already FINISHED), 0 to run." in ws.kmrun(*args).out
    nodes.write_text(nodes.read_text().replace("/ 16.0", "/ 15.0"))  # a fix, committed after the first sweep
    done = ws.kmrun(*args)
    assert done.code == 0, done.text
    assert "0 skipped (already FINISHED), 2 to run: code changed since the finished runs." in done.out
    _, children = ws.family()
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 4
    assert len({c.data.tags["kmrun.fp.code"] for c in children}) == 2
    again = ws.kmrun(*args)
    assert "2 skipped (already FINISHED), 0 to run." in again.out
    show = ws.kmrun("show", children[0].info.run_id)
    assert "kmrun.fp.code" in show.out and "kmrun.fp.data" in show.out


def count_loads(ws):
    """Make the prefix node `load` count its runs in a file."""
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace(
        '    bunch = datasets.load_digits(as_frame=True)\n',
        '    with open(__import__("os").environ["KMRUN_TEST_COUNTER"], "a") as f:\n'
        '        f.write("load\\n")\n'
        '    bunch = datasets.load_digits(as_frame=True)\n'))


def test_a_grid_runs_its_shared_prefix_once_and_gets_the_same_metrics(ws):
    count_loads(ws)
    counter = ws.path / "loads.txt"
    env = {"KMRUN_TEST_COUNTER": str(counter)}
    grid = ["-m", "+experiment=baseline", "params.model.C=0.1,0.2,0.3,0.5,1,2"]

    def runs() -> int:
        return len(counter.read_text().splitlines()) if counter.exists() else 0

    def metrics(parent_id) -> dict:
        children = [r for r in ws.runs() if r.data.tags.get("mlflow.parentRunId") == parent_id]
        return {r.data.params["model.C"]: r.data.metrics for r in children}

    done = ws.kmrun(*grid, "cache=false", env=env)
    assert done.code == 0, done.text
    assert runs() == 6
    plain = metrics(ws.family()[0][0].info.run_id)
    for extra, before in ((["cache.dir=c1"], 6), (["cache.dir=c2", "sweep.n_jobs=2"], 7)):
        done = ws.kmrun(*grid, "sweep.rerun=true", *extra, env=env)
        assert done.code == 0, done.text
        assert runs() == before + 1, extra  # the prefix ran once for the whole grid
        parent = max(ws.family()[0], key=lambda r: r.info.start_time)
        assert metrics(parent.info.run_id) == plain
        children = [r for r in ws.runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        hits = sorted(r.data.tags["kmrun.cache.hits"] for r in children)
        assert hits.count("load,split") >= 5  # and each says so
    assert "Ran load, split once for every job (node cache)." in done.out


def test_local_jobs_asking_for_a_gpu_each_run_as_many_at_a_time_as_gpus_each_on_its_own(ws):
    """No GPU here: CUDA_VISIBLE_DEVICES says which devices the machine shows, as it would
    on a GPU machine; each worker sees one of them, and the job records it."""
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.01,0.1,1,10", "sweep.n_jobs=4",
                    "ray.resources.gpus=1", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert done.code == 0, done.text
    assert "2 jobs at a time" in done.out, done.out
    _, children = ws.family()
    assert sorted({c.data.tags["kmrun.gpus"] for c in children}) == ["0", "1"]
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert all(sum(s <= start < e for s, e in spans) <= 2 for start, _ in spans)  # never more than 2 at once


def test_workers_never_outnumber_the_jobs_and_more_than_the_cpus_is_said(ws):
    import os

    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1", "sweep.n_jobs=40")
    assert done.code == 0, done.text
    assert "workers on" not in done.out  # capped at 2 jobs, which 2 CPUs can take
    cpus = os.cpu_count() or 1
    values = ",".join(f"{0.15 + 0.1 * i:.2f}" for i in range(cpus + 1))  # none of them ran before
    done = ws.kmrun("-m", "+experiment=baseline", f"params.model.C={values}", f"sweep.n_jobs={cpus + 1}")
    assert done.code == 0, done.text
    assert f"{cpus + 1} workers on {cpus} CPUs" in done.out


def test_a_wider_grid_reuses_the_cells_another_grid_finished(ws):
    assert ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1").code == 0
    done = ws.kmrun("-m", "+experiment=baseline", "params.model.C=0.1,1,10")
    assert done.code == 0, done.text
    parents, children = ws.family()
    assert len(parents) == 2 and sorted(c.data.params["model.C"] for c in children) == ["0.1", "1.0", "10.0"]
    wider = max(parents, key=lambda p: p.info.start_time)
    assert wider.data.metrics["jobs_skipped"] == 2 and wider.data.metrics["jobs_finished"] == 3
    assert wider.data.metrics["best_accuracy"] == max(c.data.metrics["accuracy"] for c in children)


def test_a_job_whose_early_nodes_are_cached_and_later_ones_are_not_reads_them_from_the_cache(ws):
    """As after a kill between two nodes: `train` is cached, `evaluate` is not. The job's own
    folder has no model.pkl, so `evaluate` must get the model from the cache."""
    import pickle as pkl

    grid = ["-m", "+experiment=baseline", "params.model.C=0.1,1"]
    assert ws.kmrun(*grid).code == 0
    for path in (ws.path / "kmrun-cache").glob("*/*.pkl"):
        if pkl.loads(path.read_bytes()).node == "evaluate":
            path.unlink()
    done = ws.kmrun(*grid, "sweep.rerun=true")
    assert done.code == 0, done.text
    parent = max(ws.family()[0], key=lambda r: r.info.start_time)
    children = [r for r in ws.runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["kmrun.cache.hits"] for r in children) == ["load,split,train"] * 2
    assert all(r.info.status == "FINISHED" and r.data.metrics["accuracy"] > 0.9 for r in children)


def test_parallel_workers_run_when_kmrun_is_process_1_as_in_a_container(ws):
    """A container's entry point is process 1: a worker must not take its parent for dead."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a PID namespace of its own needs root and unshare (util-linux)")
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "runner.cli", "-m",
               "+experiment=baseline", "params.model.C=0.1,1", "sweep.n_jobs=2"]
    done = subprocess.run(command, cwd=ws.path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stdout + done.stderr
    _, children = ws.family()
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["kmrun.pid"] for r in children} - {"1"}  # they ran in workers, beside process 1


def test_a_grid_resumed_on_changed_code_gets_a_new_parent_that_holds_only_that_code(ws):
    grid = ["-m", "+experiment=baseline", "params.model.C=0.01,1"]
    assert ws.kmrun(*grid).code == 0
    (first,), _ = ws.family()
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace("/ 16.0", "/ 4.0"))  # a helper every model node reaches
    done = ws.kmrun(*grid)
    assert done.code == 0, done.text
    text = " ".join(done.out.split())
    assert "0 skipped (already FINISHED), 2 to run: code changed" in text and "A new parent run" in text
    parents, children = ws.family()
    second = next(p for p in parents if p.info.run_id != first.info.run_id)
    assert second.data.tags["kmrun.supersedes"] == first.info.run_id
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == second.info.run_id]
    assert len(mine) == 2 and len({c.data.tags["kmrun.fingerprint"] for c in mine}) == 1
    misses = " ".join(c.data.tags.get("kmrun.cache.misses", "") for c in mine)
    assert "split: code of digits.pipelines.train.nodes.features" in misses, misses  # said where it changed
    best = max(mine, key=lambda c: c.data.metrics["accuracy"])
    assert second.data.metrics["jobs_total"] == 2 and second.data.metrics["best_accuracy"] == best.data.metrics["accuracy"]
    assert second.data.tags["kmrun.best_run_id"] == best.info.run_id
    assert second.data.tags["kmrun.best.params.model.C"] == best.data.params["model.C"].removesuffix(".0")
    again = ws.kmrun(*grid, "cache=false")  # the same code again: resumes this parent, skips both cells
    assert again.code == 0 and "2 skipped" in again.out and len(ws.family()[0]) == 2
    reopened = ws.client().get_run(second.info.run_id)
    assert reopened.data.tags["kmrun.sweep"].endswith("cache=false")  # the latest command, which `kmrun join` runs
