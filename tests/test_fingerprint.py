"""A job's fingerprint: which change moves which part, and nothing else."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
from kedro.pipeline import Pipeline, node

from runner import deps
from runner.datasets import Catalog
from runner.fingerprint import Fingerprint, of_pipeline

NODES = "def f(raw, a):\n    return raw + a\n\n\ndef g(x):\n    return x\n"
CATALOG = {"raw": {"type": "pandas.CSVDataset", "filepath": "data/01_raw/raw.csv"},
           "out": {"type": "pickle.PickleDataset", "filepath": "data/06_models/out.pkl"}}


@pytest.fixture
def root(tmp_path, monkeypatch):
    for path, text in {"src/kmrun_fp_pkg/__init__.py": "", "src/kmrun_fp_pkg/nodes.py": NODES,
                       "data/01_raw/raw.csv": "x\n1\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield tmp_path
    sys.modules.pop("kmrun_fp_pkg.nodes", None)
    sys.modules.pop("kmrun_fp_pkg", None)
    deps.forget()


def fp(root, params=None, catalog=None) -> Fingerprint:
    sys.modules.pop("kmrun_fp_pkg.nodes", None)
    deps.forget()
    importlib.invalidate_caches()
    nodes = importlib.import_module("kmrun_fp_pkg.nodes")
    pipeline = Pipeline([node(nodes.f, ["raw", "params:a"], "out", name="f")])
    return of_pipeline(pipeline, params or {"a": 1, "b": 1}, Catalog(catalog or CATALOG, root), root)


def parts(a: Fingerprint, b: Fingerprint) -> set[str]:
    return {p for p in ("code", "config", "data", "environment") if getattr(a, p) != getattr(b, p)}


def test_each_change_moves_exactly_its_part(root, monkeypatch):
    before = fp(root)
    assert fp(root) == before  # stable
    (root / "src/kmrun_fp_pkg/nodes.py").write_text(NODES.replace("raw + a", "raw + a + 1"))
    assert parts(before, after := fp(root)) == {"code"}
    assert parts(after, fp(root, params={"a": 3, "b": 1})) == {"config"}
    load_args = {**CATALOG, "raw": {**CATALOG["raw"], "load_args": {"sep": ";"}}}
    assert parts(after, fp(root, catalog=load_args)) == {"config"}
    (root / "data/01_raw/raw.csv").write_text("x\n2\n")
    assert parts(after, after2 := fp(root)) == {"data"}
    assert after2.changed(after.tags()) == ["input data"] and after2.changed(after2.tags()) == []
    monkeypatch.setattr(deps, "environment", lambda root: {"numpy": "0.1"})
    assert parts(after2, moved := fp(root)) == {"environment"} and moved.changed(after2.tags()) == ["environment"]


def test_what_does_not_change_a_result_does_not_move_it(root):
    before = fp(root)
    (root / "src/kmrun_fp_pkg/nodes.py").write_text("# a comment\n" + NODES.replace("\n", "\r\n"))
    (root / "src/kmrun_fp_pkg/notes.py").write_text("UNUSED = 1\n")  # a module the pipeline never imports
    (root / "src/kmrun_fp_pkg/nodes.py").write_text(NODES.replace("return x\n", "return x + 1\n"))  # g: no node
    (root / "data/06_models").mkdir(parents=True)
    (root / "data/06_models/out.pkl").write_bytes(b"an output, not an input")
    os.utime(root / "data/01_raw/raw.csv", (1, 1))  # touched, same content
    assert fp(root, params={"a": 1, "b": 2}) == before  # b: a parameter no node reads


def test_runs_without_a_recorded_fingerprint_are_not_trusted(root):
    assert fp(root).changed({}) == ["unrecorded"]


def test_every_file_of_a_folder_dataset_counts_even_an_editor_backup(tmp_path):
    """A folder dataset without a filename_suffix (PartitionedDataset) reads every file in
    it, a backup too: kmrun cannot tell which files a dataset skips, so none is left out."""
    from runner.datasets import file_state

    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-0.csv").write_text("x\n1\n")
    before = file_state(folder)
    (folder / "part-0.csv~").write_text("x\n9\n")
    assert file_state(folder) != before
    (folder / "part-0.csv~").unlink()
    assert file_state(folder) == before


def test_a_folder_dataset_with_a_filename_suffix_counts_only_the_files_it_reads(tmp_path):
    """PartitionedDataset(filename_suffix=".csv") lists only files ending in .csv: an
    editor's backup or a file manager's .DS_Store beside them is not its data."""
    from runner.datasets import file_state

    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-0.csv").write_text("x\n1\n")
    before = file_state(folder, ".csv")
    (folder / "part-0.csv~").write_text("x\n9\n")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    assert file_state(folder, ".csv") == before
    (folder / "part-1.csv").write_text("x\n2\n")  # a new partition is data
    assert file_state(folder, ".csv") != before
