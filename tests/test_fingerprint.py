"""A job's fingerprint: which change moves which part, and nothing else."""

from __future__ import annotations

import os

from runner.fingerprint import Fingerprint, of_project

CATALOG = {"raw": {"type": "pandas.CSVDataset", "filepath": "data/01_raw/raw.csv"},
           "model": {"type": "pickle.PickleDataset", "filepath": "data/06_models/model.pkl"},
           "remote": {"type": "pandas.CSVDataset", "filepath": "s3://bucket/x.csv"}}


def project(tmp_path):
    for path, text in {
        "src/kmrun_fp_pkg/__init__.py": "", "src/kmrun_fp_pkg/nodes.py": "def f(x):\n    return x\n",
        "conf/base/parameters.yml": "a: 1\n", "conf/base/catalog.yml": "raw: {}\n",
        "conf/local/credentials.yml": "pw: x\n", "conf/base/logging.yml": "version: 1\n",
        "conf/prod/parameters.yml": "a: 2\n", "data/01_raw/raw.csv": "x\n1\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return tmp_path


def fp(root, env="local", inputs=("raw", "remote", "params:a")):
    return of_project(root, "kmrun_fp_pkg", env, CATALOG, inputs)


def parts(a: Fingerprint, b: Fingerprint) -> set[str]:
    return {p for p in ("code", "config", "data") if getattr(a, p) != getattr(b, p)}


def test_each_change_moves_exactly_its_part(tmp_path):
    root = project(tmp_path)
    before = fp(root)
    assert fp(root) == before  # stable
    (root / "src/kmrun_fp_pkg/nodes.py").write_text("def f(x):\n    return x + 1\n")
    assert parts(before, after := fp(root)) == {"code"}
    (root / "conf/base/parameters.yml").write_text("a: 3\n")
    assert parts(after, after2 := fp(root)) == {"config"}
    (root / "conf/base/catalog.yml").write_text("raw: {type: x}\n")
    assert parts(after2, after3 := fp(root)) == {"config"}
    (root / "data/01_raw/raw.csv").write_text("x\n2\n")
    assert parts(after3, after4 := fp(root)) == {"data"}
    assert after4.changed(after3.tags()) == ["input data"] and after4.changed(after4.tags()) == []


def test_what_does_not_change_a_result_does_not_move_it(tmp_path):
    root = project(tmp_path)
    before = fp(root)
    (root / "conf/local/credentials.yml").write_text("pw: other\n")
    (root / "conf/base/logging.yml").write_text("version: 1\nroot: {}\n")
    (root / "conf/prod/parameters.yml").write_text("a: 9\n")  # another env
    (root / "data/06_models/model.pkl").parent.mkdir(parents=True)
    (root / "data/06_models/model.pkl").write_bytes(b"an output, not an input")
    os.utime(root / "data/01_raw/raw.csv", (1, 1))  # touched, same content
    assert fp(root) == before
    assert fp(root, env="prod") != before  # the env's own files count


def test_runs_without_a_recorded_fingerprint_are_not_trusted(tmp_path):
    assert fp(project(tmp_path)).changed({}) == ["unrecorded"]
