"""The node cache proven by difference: a Kedro project mutated in many small ways, one
edit at a time. After each edit, a default run (cache on) must record the same metrics
as a ``cache=false`` run of the same code (no stale hit), and serve from the cache every
node the edit cannot reach (no needless recomputation).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kedro_projects import pip, project, wheel

pytestmark = pytest.mark.slow

NODES = '''import kmrun_mut.weights as weights
import kmrun_tinylib
from kmrun_mut.decorators import logged
from kmrun_mut.helpers import make_model
from kmrun_mut_sib.adjust import adjust

OFFSET = 0.25


def load(raw):
    return [float(v) for v in raw["x"]]


def clean(values, clean):
    return [v * clean["scale"] for v in values]


def features(cleaned):
    return [v + 1.0 for v in cleaned]


@logged
def train(feats, model, shift=0.0):
    fitted = make_model(model["alpha"])
    return fitted.fit(feats) + OFFSET + shift + weights.W * kmrun_tinylib.FACTOR


def evaluate(coef, feats):
    return {"score": adjust(coef) / len(feats)}
'''
FILES = {
    "src/kmrun_mut/nodes.py": NODES,
    "src/kmrun_mut/helpers.py": "from kmrun_mut.models import Model\n\nSCALE = 2.0\n\n\n"
                                "def make_model(alpha):\n    return Model(alpha * SCALE)\n\n\n"
                                "def unused():\n    return 1\n",
    "src/kmrun_mut/models.py": "class Base:\n    def bias(self):\n        return 1.0\n\n\nclass Model(Base):\n"
                               "    def __init__(self, alpha):\n        self.alpha = alpha\n\n"
                               "    def fit(self, xs):\n        return sum(xs) * self.alpha + self.bias()\n",
    "src/kmrun_mut/decorators.py": "import functools\n\n\ndef logged(fn):\n    @functools.wraps(fn)\n"
                                   "    def wrapper(*args, **kwargs):\n        return fn(*args, **kwargs) * 1.0\n"
                                   "    return wrapper\n",
    "src/kmrun_mut/weights.py": "W = 0.5\n",
    "src/kmrun_mut_sib/__init__.py": "",
    "src/kmrun_mut_sib/adjust.py": "def adjust(v):\n    return v + 3.0\n",
    "conf/prod/parameters.yml": "model:\n  alpha: 0.3\n",
    "data/raw.csv": "x\n" + "".join(f"{i}\n" for i in range(1, 21)),
}
PIPELINE = '''from kedro.pipeline import Pipeline, node

from kmrun_mut import nodes


def register_pipelines():
    return {"__default__": Pipeline([
        node(nodes.load, "raw", "values", name="load"),
        node(nodes.clean, ["values", "params:clean"], "cleaned", name="clean"),
        node(nodes.features, "cleaned", "feats", name="features"),
        node(nodes.train, ["feats", "params:model"], "coef", name="train"),
        node(nodes.evaluate, ["coef", "feats"], "metrics", name="evaluate"),
    ])}
'''
ALL = {"load", "clean", "features", "train", "evaluate"}
MODEL = {"train", "evaluate"}
CATALOG_LOAD_ARGS = "raw:\n  type: pandas.CSVDataset\n  filepath: data/raw.csv\n  load_args:\n    nrows: 15\n"

# (what, file or None, old, new, extra kmrun arguments, the nodes that must run again, whether the result moves)
EDITS = [
    ("constant in the node's module", "src/kmrun_mut/nodes.py", "OFFSET = 0.25", "OFFSET = 0.75", (), MODEL, True),
    ("helper-module function", "src/kmrun_mut/helpers.py", "alpha * SCALE", "alpha * SCALE + 0.01", (), MODEL, True),
    ("constant in a helper module", "src/kmrun_mut/helpers.py", "SCALE = 2.0", "SCALE = 3.0", (), MODEL, True),
    ("method of a class", "src/kmrun_mut/models.py", "* self.alpha +", "* self.alpha * 1.5 +", (), MODEL, True),
    ("method of a base class", "src/kmrun_mut/models.py", "return 1.0", "return 2.0", (), MODEL, True),
    ("decorator", "src/kmrun_mut/decorators.py", "* 1.0", "* 1.1", (), MODEL, True),
    ("default argument", "src/kmrun_mut/nodes.py", "shift=0.0", "shift=0.5", (), MODEL, True),
    ("sibling package under src/", "src/kmrun_mut_sib/adjust.py", "v + 3.0", "v + 4.0", (), {"evaluate"}, True),
    ("import module + module.attr", "src/kmrun_mut/weights.py", "W = 0.5", "W = 0.7", (), MODEL, True),
    ("installed distribution's version", None, "1.0", "2.0", (), MODEL, True),
    ("data file", "data/raw.csv", "x\n1\n", "x\n5\n", (), ALL, True),
    ("catalog load_args", "conf/base/catalog.yml", None, CATALOG_LOAD_ARGS, (), ALL, True),
    ("Kedro env", None, None, None, ("kedro.env=prod",), MODEL, True),
    ("comment only", "src/kmrun_mut/helpers.py", "SCALE = 3.0\n", "SCALE = 3.0  # why three\n", (), set(), False),
    ("function no node calls", "src/kmrun_mut/helpers.py", "return 1\n", "return 2\n", (), set(), False),
    ("CRLF line endings", "src/kmrun_mut/nodes.py", "\n", "\r\n", (), set(), False),
]


def kmrun(where: Path, *args: str) -> dict:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=where, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"],
                             max_results=1)[0]
    return {"metrics": run.data.metrics, "hits": set(run.data.tags["kmrun.cache.hits"].split(",")) - {"none"},
            "misses": run.data.tags.get("kmrun.cache.misses", "")}


@pytest.fixture
def tinylib(tmp_path):
    versions = {v: wheel(tmp_path, "kmrun_tinylib", v, f"FACTOR = {float(v)}\n") for v in ("1.0", "2.0")}
    pip("install", "--no-deps", "--no-index", str(versions["1.0"]))
    yield versions
    pip("uninstall", "-y", "kmrun_tinylib")


def test_cached_runs_equal_fresh_runs_after_every_kind_of_edit(tmp_path, template_store, tinylib):
    root = tmp_path / "ws"
    where = project(root, "kmrun_mut", PIPELINE, FILES, {"clean": {"scale": 1.0}, "model": {"alpha": 0.1}},
                    {"raw": {"type": "pandas.CSVDataset", "filepath": "data/raw.csv"}},
                    {"objective": {"metric": "score", "direction": "maximize"}, "metrics": ["metrics"]},
                    template_store)
    previous = kmrun(root)["metrics"]
    stale, needless, report = [], [], []
    for what, path, old, new, args, expected, moves in EDITS:
        if path is not None:
            target = where / path
            text = target.read_bytes().decode()
            target.write_bytes((text.replace(old, new) if old is not None else new).encode())
        elif what.startswith("installed"):
            pip("install", "--no-deps", "--no-index", "--force-reinstall", str(tinylib[new]))
        cached = kmrun(root, *args)
        fresh = kmrun(root, *args, "cache=false")
        ran = ALL - cached["hits"]
        if cached["metrics"] != fresh["metrics"] or not expected <= ran:
            stale.append(what)
        if ran - expected:
            needless.append(f"{what}: {sorted(ran - expected)}")
        assert (fresh["metrics"] != previous) == moves, f"{what}: the edit must {'' if moves else 'not '}move the result"
        report.append(f"{what:<36} ran {','.join(sorted(ran)) or '-':<36} {cached['misses'][:120]}")
        if not args:  # the next edit is compared with the default env
            previous = fresh["metrics"]
    print("\n".join(report))
    print(f"stale hits: {len(stale)}  needless recomputations: {len(needless)}  edits: {len(EDITS)}")
    assert stale == [], f"stale cache hits after: {stale}\n" + "\n".join(report)
    assert needless == [], f"needless recomputations: {needless}\n" + "\n".join(report)
    # the refreshed entries are served afterwards: a default run after cache=false reruns nothing
    assert kmrun(root)["hits"] == ALL
