"""Kedro's own features through kmrun: a pipeline instantiated under two namespaces,
datasets named by factory patterns (inputs and outputs), and catalog paths that read
``${runtime_params:...}``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_runs
from kedro_projects import project, write

pytestmark = pytest.mark.slow

NODES = '''def train(data, w):
    return {"w": w, "mean": float(data["x"].mean())}


def evaluate(regressor, data):
    return {"r2": regressor["mean"] * regressor["w"] / 100, "mae": float(len(data))}
'''
PIPELINE = '''from kedro.pipeline import Pipeline, node, pipeline

from kmrun_ns.nodes import evaluate, train


def register_pipelines():
    base = Pipeline([
        node(train, ["data", "params:w"], "regressor", name="train"),
        node(evaluate, ["regressor", "data"], "metrics", name="evaluate"),
    ])
    both = sum(pipeline(base, namespace=ns, inputs={"data": "model_input_csv"}) for ns in ("active", "candidate"))
    return {"__default__": both}
'''
CATALOG = {
    "{source}_csv": {"type": "pandas.CSVDataset", "filepath": "data/01_raw/{source}.csv"},
    "{namespace}.regressor": {"type": "json.JSONDataset", "filepath": "data/06_models/{namespace}_regressor.json"},
    "{namespace}.metrics": {"type": "json.JSONDataset", "filepath": "data/08_reporting/{namespace}_metrics.json"},
}
ROWS = "x\n" + "".join(f"{i}\n" for i in range(1, 41))


def kmrun(root: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def runs(root: Path, children: bool = True) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])
    return [r for r in found if not children or r.data.tags.get("kmrun.role") != "parent"]


@pytest.fixture
def ns(tmp_path, template_store):
    where = project(tmp_path, "kmrun_ns", PIPELINE, {"src/kmrun_ns/nodes.py": NODES, "data/01_raw/model_input.csv": ROWS},
                    {"active": {"w": 1.0}, "candidate": {"w": 2.0}}, CATALOG,
                    {"objective": {"metric": "active.metrics.r2", "direction": "maximize"},
                     "metrics": ["active.metrics", "candidate.metrics"], "artifacts": ["active.regressor"]},
                    template_store)
    return tmp_path, where


def test_namespaces_keep_their_own_metrics_and_factory_datasets_are_found_everywhere(ns):
    root, where = ns
    kmrun(root)
    (run,) = runs(root)
    metrics = run.data.metrics
    assert metrics["active.metrics.r2"] == pytest.approx(20.5 / 100) and metrics["candidate.metrics.r2"] == pytest.approx(
        2 * 20.5 / 100)
    assert "r2" not in metrics and run.data.tags["kmrun.fp.data"] != "e3b0c44298fc1c14"  # not the digest of nothing
    assert "kmrun.cache.not_cached" not in run.data.tags  # factory inputs are fingerprinted: every node is cacheable

    # a parallel grid: each job writes its factory outputs into its own folder, and logs its own artifact
    (where / "data/06_models/active_regressor.json").unlink()  # the single run wrote the project's own file
    kmrun(root, "-m", "params.active.w=3,4", "sweep.n_jobs=2")
    cells = child_runs(runs(root))
    assert len(cells) == 2 and not (where / "data/06_models/active_regressor.json").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    logged = {}
    for cell in cells:
        path = client.download_artifacts(cell.info.run_id, "outputs/active_regressor.json", str(root / cell.info.run_id))
        logged[cell.data.params["active.w"]] = json.loads(Path(path).read_text())["w"]
    assert logged == {"3.0": 3.0, "4.0": 4.0}

    # a changed factory-resolved input: resume does not skip, the cache does not serve
    (where / "data/01_raw/model_input.csv").write_text("x\n" + "".join(f"{i}\n" for i in range(1, 21)))
    done = kmrun(root, "-m", "params.active.w=3,4")
    assert "0 skipped (already FINISHED), 2 to run: input data changed" in " ".join(done.stdout.split()), done.stdout
    before = {r.info.run_id for r in runs(root, children=False)}
    latest = runs(root)[-2:]
    assert {r.data.metrics["active.metrics.mae"] for r in latest} == {20.0}
    served = {source for r in latest for source in r.data.tags.get("kmrun.cache.from", "").split(",") if source}
    assert not served & (before - {r.info.run_id for r in latest} - {latest[0].data.tags.get("mlflow.parentRunId")})


def test_a_catalog_path_that_reads_runtime_params_keys_each_job_by_its_own_file(ns):
    root, where = ns
    catalog = {**CATALOG, "model_input_csv": {"type": "pandas.CSVDataset",
                                              "filepath": "data/01_raw/${runtime_params:data.file, model_input}.csv"}}
    import yaml

    write(where, {"conf/base/catalog.yml": yaml.safe_dump(catalog),
                  "data/01_raw/small.csv": "x\n1\n2\n",
                  "conf/base/parameters.yml": yaml.safe_dump({"active": {"w": 1.0}, "candidate": {"w": 2.0},
                                                              "data": {"file": "model_input"}})})
    kmrun(root, "-m", "params.data.file=model_input,small")
    cells = {r.data.params["data.file"]: r for r in runs(root) if r.data.tags.get("kmrun.role") == "child"}
    assert cells["model_input"].data.metrics["active.metrics.mae"] == 40.0
    assert cells["small"].data.metrics["active.metrics.mae"] == 2.0  # its own file, not the first cell's result
    assert cells["small"].data.tags["kmrun.fp.data"] != cells["model_input"].data.tags["kmrun.fp.data"]


def test_an_artifact_of_a_node_the_cache_served_is_this_runs_own_value(ns):
    root, where = ns
    conf = root / "conf/kmrun.yaml"
    conf.write_text(conf.read_text().replace("active.regressor", "candidate.regressor"))
    kmrun(root)  # candidate.w = 2: computed, and cached
    kmrun(root, "params.candidate.w=5")  # leaves w = 5 in the project's own file
    kmrun(root)  # candidate's nodes come from the cache: the project's file is not this run's
    run = runs(root)[-1]
    assert "candidate.train" in run.data.tags["kmrun.cache.hits"]
    from mlflow import MlflowClient

    path = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").download_artifacts(
        run.info.run_id, "outputs/candidate_regressor.json", str(root))
    assert json.loads(Path(path).read_text())["w"] == 2.0
    assert json.loads((where / "data/06_models/candidate_regressor.json").read_text())["w"] == 5.0
