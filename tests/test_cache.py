"""The node cache's keys: which change invalidates which node, and nothing else."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from pathlib import Path

import pytest
from kedro.pipeline import Pipeline, node

from runner import deps
from runner.cache import NodeCache, node_keys, plan, token
from runner.datasets import Catalog
from runner.trace import Ran

RAN = Ran()  # a node that ran no project code and read nothing

NODES = '''
def load(raw):
    return raw


def helper(x):
    return x * 2


def features(a, p):
    return helper(a) + p


def model(b, q):
    return b + q
'''


@pytest.fixture
def mod(tmp_path, monkeypatch):
    (tmp_path / "kmrun_cache_nodes.py").write_text(NODES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("kmrun_cache_nodes", None)
    yield importlib.import_module("kmrun_cache_nodes")
    sys.modules.pop("kmrun_cache_nodes", None)


def pipeline(mod, tags=()):
    return Pipeline([
        node(mod.load, "raw", "a", name="load"),
        node(mod.features, ["a", "params:p"], "b", name="features", tags=list(tags)),
        node(mod.model, ["b", "params:q"], "c", name="model"),
    ])


CATALOG = {"raw": {"type": "pandas.CSVDataset", "filepath": "data/raw.csv"},
           "c": {"type": "json.JSONDataset", "filepath": "data/c.json"}}


def keys(mod, tmp_path, params=None, catalog=None, tags=()):
    deps.forget()
    return node_keys(pipeline(mod, tags), params or {"p": 1, "q": 2}, Catalog(catalog or CATALOG, tmp_path), tmp_path)[:2]


def moved(a, b):
    return {n for n in a[0] if a[0][n] != b[0][n]}


def test_each_change_invalidates_exactly_the_nodes_it_reaches(mod, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("x\n1\n")
    base = keys(mod, tmp_path)
    assert all(base[0].values()) and keys(mod, tmp_path) == base
    assert moved(base, keys(mod, tmp_path, {"p": 1, "q": 3})) == {"model"}
    assert moved(base, keys(mod, tmp_path, {"p": 5, "q": 2})) == {"features", "model"}
    catalog = {**CATALOG, "b": {"type": "pickle.PickleDataset", "filepath": "data/b.pkl"}}
    assert moved(base, keys(mod, tmp_path, catalog=catalog)) == {"features", "model"}
    (tmp_path / "kmrun_cache_nodes.py").write_text(NODES.replace("x * 2", "x * 3"))  # a helper features calls
    changed = importlib.reload(mod)
    assert moved(base, keys(changed, tmp_path)) == {"features", "model"}
    (tmp_path / "data/raw.csv").write_text("x\n2\n")
    assert moved(keys(changed, tmp_path), keys(changed, tmp_path, {"p": 1, "q": 2})) == set()
    assert moved(base, keys(changed, tmp_path)) == {"load", "features", "model"}


def test_nocache_nodes_and_unfingerprintable_inputs_are_never_cached(mod, tmp_path):
    found, reasons = keys(mod, tmp_path, tags=["kmrun_nocache"])
    assert found["load"] is not None and found["features"] is None and found["model"] is None
    assert reasons["features"] == "it is tagged kmrun_nocache" and "made by features" in reasons["model"]
    found, reasons = keys(mod, tmp_path, catalog={"raw": {"type": "pandas.SQLTableDataset", "table_name": "t"}})
    assert set(reasons) == {"load", "features", "model"} and "not a local file" in reasons["load"]


def test_the_cache_serves_hits_and_feeds_the_nodes_that_run(mod, tmp_path):
    store = NodeCache(tmp_path / "cache", max_bytes=10**6)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("x\n")
    first = plan(pipeline(mod), {"p": 1, "q": 2}, Catalog(CATALOG, tmp_path), tmp_path, store)
    assert first.run == ["load", "features", "model"] and not first.hits
    assert store.put(first.keys["load"], "load", {"a": 10}, "run-1", ran=RAN) is None
    assert store.put(first.keys["features"], "features", {"b": 21}, "run-1", ran=RAN,
                     inputs={"a": token(first.keys["load"], RAN)}) is None
    second = plan(pipeline(mod), {"p": 1, "q": 9}, Catalog(CATALOG, tmp_path), tmp_path, NodeCache(tmp_path / "cache", 10**6))
    assert second.run == ["model"] and second.inject == {"b": 21} and second.sources == {"load": "run-1", "features": "run-1"}
    assert store.put("ab" + "0" * 30, "x", {"f": lambda: 1}, "r", ran=RAN).startswith("its outputs cannot be pickled")


def test_an_entry_is_used_only_with_the_entries_its_inputs_came_from(mod, tmp_path):
    """A producer computed again (its code changed at run time: the same key) while the
    consumer's entry was not (a kill between the two): the consumer's entry is not used."""
    store = NodeCache(tmp_path / "cache", max_bytes=10**6)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("x\n")
    first = plan(pipeline(mod), {"p": 1, "q": 2}, Catalog(CATALOG, tmp_path), tmp_path, store)
    old = RAN
    store.put(first.keys["load"], "load", {"a": 10}, "run-1", ran=old)
    store.put(first.keys["features"], "features", {"b": 21}, "run-1", ran=RAN, inputs={"a": token(first.keys["load"], old)})
    assert plan(pipeline(mod), {"p": 1, "q": 2}, Catalog(CATALOG, tmp_path), tmp_path, store).run == ["model"]
    from runner.trace import file_digest

    new = Ran(files={"data/raw.csv": file_digest("data/raw.csv", tmp_path)})  # load did other things since, and
    # stored its entry; features did not
    store.put(first.keys["load"], "load", {"a": 11}, "run-2", ran=new)
    again = plan(pipeline(mod), {"p": 1, "q": 2}, Catalog(CATALOG, tmp_path), tmp_path, store)
    assert again.hits.keys() == {"load"} and again.run == ["features", "model"]
    assert again.why["features"] == "its input a is not the one its entry was computed from"


def test_least_recently_used_entries_go_beyond_the_size_limit(tmp_path):
    store = NodeCache(tmp_path, max_bytes=3000)
    for i in range(6):
        assert store.put(f"{i:02d}" + "k" * 30, f"n{i}", {"x": "y" * 900}, "r", ran=RAN) is None
    assert store.size() <= 3000 and store.get("05" + "k" * 30) is not None
    kept = len(store.files())
    assert 0 < kept < 6 and store.clear() == kept and store.files() == []


def test_folders_and_factory_patterns_are_fingerprinted_like_files(mod, tmp_path):
    (tmp_path / "data/parts").mkdir(parents=True)
    (tmp_path / "data/parts/a.csv").write_text("x\n1\n")
    (tmp_path / "data/raw.csv").write_text("x\n1\n")
    for i, catalog in enumerate((
        {"raw": {"type": "partitions.PartitionedDataset", "path": "data/parts", "dataset": "pandas.CSVDataset"}},
        {"r{rest}": {"type": "pandas.CSVDataset", "filepath": "data/parts/a.csv"}},  # a factory pattern
    )):
        found, reasons = keys(mod, tmp_path, catalog=catalog)
        assert not reasons, reasons
        (tmp_path / "data/parts/a.csv").write_text(f"x\n{i + 10}\n")
        if "raw" in catalog:
            (tmp_path / "data/parts/b.csv").write_text("x\n3\n")
        assert moved((found, reasons), keys(mod, tmp_path, catalog=catalog)) == {"load", "features", "model"}


def test_credentials_are_kept_by_name_and_never_resolved():
    catalog = Catalog({"db": {"type": "pandas.SQLTableDataset", "table_name": "t", "credentials": "db_creds"},
                       "x": {"type": "pandas.CSVDataset", "filepath": "a.csv", "credentials": {"key": "s3cret"}}},
                      Path("/tmp"))
    assert catalog.entry("db")["credentials (name)"] == "db_creds" and catalog.location("db") is None
    assert "s3cret" not in str(catalog.entry("x")) and catalog.location("x") == Path("/tmp/a.csv")


def test_cache_false_serves_nothing_and_refreshes_every_entry(mod, tmp_path):
    store = NodeCache(tmp_path / "cache", max_bytes=10**6)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.csv").write_text("x\n")
    catalog = Catalog(CATALOG, tmp_path)
    first = plan(pipeline(mod), {"p": 1, "q": 2}, catalog, tmp_path, store)
    store.put(first.keys["load"], "load", {"a": 10}, "run-1", first.parts["load"], ran=RAN)
    again = plan(pipeline(mod), {"p": 1, "q": 2}, catalog, tmp_path, store, serve=False)
    assert not again.hits and again.run == ["load", "features", "model"] and again.keys == first.keys
    third = plan(pipeline(mod), {"p": 7, "q": 2}, catalog, tmp_path, store)
    assert third.hits.keys() == {"load"} and third.why["features"] == "no earlier entry of this node"
    store.put(third.keys["features"], "features", {"b": 1}, "run-2", third.parts["features"], ran=RAN)
    fourth = plan(pipeline(mod), {"p": 8, "q": 2}, catalog, tmp_path, store)
    assert fourth.why["features"] == "new inputs: param p: 7 -> 8"  # against the last entry of any inputs


def test_a_damaged_entry_of_any_kind_is_a_miss_and_goes(tmp_path):
    store = NodeCache(tmp_path, max_bytes=10**6)
    key = "ab" + "c" * 30
    assert store.put(key, "n", {"x": 1}, "r", ran=RAN) is None
    store.path(key).write_bytes(pickle.dumps(5))  # unpickles, to the wrong type
    fresh = NodeCache(tmp_path, max_bytes=10**6)
    assert fresh.get(key) is None and not fresh.path(key).exists() and fresh.entries() == []


def test_entry_files_are_named_by_a_salted_key_and_secret_params_are_not_cached(mod, tmp_path):
    store = NodeCache(tmp_path / "cache", max_bytes=10**6)
    key = "ab" + "c" * 30
    store.put(key, "n", {"x": 1}, "r", ran=RAN)
    assert key not in str(store.path(key)) and oct((tmp_path / "cache/salt").stat().st_mode & 0o777) == "0o600"
    assert NodeCache(tmp_path / "other", 10**6).path(key) != store.path(key)  # each cache its own salt
    params = {"p": {"db_password": "Hunter2Pass"}, "q": 2}
    found, reasons = keys(mod, tmp_path, params=params)
    assert found["features"] is None and "secret-named parameter p.db_password" in reasons["features"]
    deps.forget()
    allowed, _, parts = node_keys(pipeline(mod), params, Catalog(CATALOG, tmp_path), tmp_path, allow_secrets=True)
    assert allowed["features"] is not None
    store.put(allowed["features"], "features", {"b": 1}, "r", parts["features"], ran=RAN)
    beside = [p.read_text() for p in (tmp_path / "cache/nodes").glob("*.json")]
    assert beside and not [text for text in beside if "Hunter2Pass" in text]  # parameter values by digest only


def test_a_nodes_explanation_is_written_when_it_changes_and_always_holds_the_last_entrys_parts(tmp_path):
    ours, theirs = NodeCache(tmp_path, 10**6), NodeCache(tmp_path, 10**6)  # two processes on one folder
    first = {"code": "a1", "param model.C": "1"}
    ours.put("k1", "train", {"m": 1}, "run1", first, ran=RAN)
    written = ours._last("train").stat().st_ino
    ours.put("k2", "train", {"m": 2}, "run2", first, ran=RAN)  # the same parts: the file is left as it is
    assert ours._last("train").stat().st_ino == written
    theirs.put("k3", "train", {"m": 3}, "run3", {"code": "a1", "param model.C": "2"}, ran=RAN)
    assert json.loads(ours._last("train").read_text())["param model.C"] == "2"  # the last entry stored is theirs
    assert ours.why("train", {"code": "a2", "param model.C": "1"}).startswith("code")  # against the entry for C=1
    ours.put("k4", "train", {"m": 4}, "run4", first, ran=RAN)  # ours again, though this process wrote it before
    assert ours.why("train", first) == theirs.why("train", first) == "its entry was evicted or cleared"


def test_cache_tags_keep_one_line_per_node_whatever_the_reasons_hold():
    """A reason may hold "; " and ": " (environment: scikit-learn 1.8 -> 1.9; param model.C: 1 -> 2):
    kmrun cache explain must still list the real nodes only, each hit with its own source run."""
    from runner.cache import Entry, Plan
    from runner.commands import _records
    from runner.job_cache import cache_tags
    from runner.kedro_bridge import KedroRun

    why = {"train": "environment: scikit-learn 1.8 -> 1.9; param model.C: 1 -> 2", "evaluate": "its input m is computed again by train"}
    plan_ = Plan({"load": "k1", "split": "k2", "train": "k3", "evaluate": "k4"}, {}, {},
                 hits={"load": Entry("load", {}, "run-a", 0.0), "split": Entry("split", {}, "run-b", 0.0)},
                 run=["train", "evaluate"], why=why)
    tags = cache_tags(KedroRun("r", plan=plan_, not_cached={"report": "its outputs cannot be pickled (x: y)"}))
    assert _records(tags["kmrun.cache.misses"]) == why
    assert _records(tags["kmrun.cache.sources"]) == {"load": "run-a", "split": "run-b"}
    assert _records(tags["kmrun.cache.not_cached"]) == {"report": "its outputs cannot be pickled (x: y)"}
