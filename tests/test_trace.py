"""What a node ran and read, recorded while it runs: each recorded unit moves with the edits
that change what the node does, and stays put under the edits that do not."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

from runner import trace

SALT = b"s" * 32
FILES = {
    "pkg/__init__.py": "",
    "pkg/consts.py": "W = 0.5\n",
    "pkg/helpers.py": "import decimal\n\nfrom pkg.consts import W\n\nSCALE = 2\nOTHER = 1\n"
                      "decimal.getcontext().prec = 28\n\n\ndef scale(x):\n    return x * SCALE * W\n\n\n"
                      "def unused(x):\n    return x\n",
    "pkg/late.py": "def late(x):\n    return x + 100\n",
    "pkg/relconsts.py": "R = 2.0\n",
    "pkg/rel.py": "from .relconsts import R\n\n\ndef rel(x):\n    return x * R\n",
    "pkg/nodes.py": "import os\n\nfrom pkg.helpers import scale\nfrom pkg.rel import rel\n\n\ndef node(x, path=None):\n"
                    "    from pkg.late import late  # imported in the body\n"
                    "    shift = float(os.getenv('KMRUN_TEST_SHIFT', '0'))\n"
                    "    text = open(path).read() if path else ''\n"
                    "    return late(scale(x)) + shift + len(text) + rel(1.0)\n",
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    for path, text in FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "pkg" or m.startswith("pkg.")]:
        del sys.modules[name]
    trace.install()
    yield tmp_path
    for name in [m for m in sys.modules if m == "pkg" or m.startswith("pkg.")]:
        del sys.modules[name]


def record(root, *args):
    recorder = trace.Recorder(root)
    nodes = importlib.import_module("pkg.nodes")
    recorder.start()
    recorder.io = True
    try:
        nodes.node(*args)
    finally:
        ran = recorder.stop(SALT)
    return ran


def edit(root, path, old, new):
    target = root / path
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new))


def test_what_ran_is_recorded_by_function_and_module(project):
    ran = record(project, 1.0)
    assert {"pkg/nodes.py::node", "pkg/helpers.py::scale", "pkg/late.py::late"} <= set(ran.code)
    assert "pkg/helpers.py::unused" not in ran.code  # not executed
    files = {unit.partition("::")[0] for unit in ran.code}
    assert {"pkg/nodes.py", "pkg/helpers.py", "pkg/consts.py", "pkg/late.py"} <= files  # module-level code, imports too
    assert ran.changes(project, SALT) == []


EDITS = [
    # (file, old, new, whether what the node ran changed)
    ("pkg/helpers.py", "x * SCALE", "x * SCALE + 1", True),
    ("pkg/helpers.py", "SCALE = 2", "SCALE = 3", True),
    ("pkg/consts.py", "W = 0.5", "W = 0.7", True),  # a constant another module imports
    ("pkg/late.py", "x + 100", "x + 101", True),  # a module imported inside the node
    ("pkg/relconsts.py", "R = 2.0", "R = 3.0", True),  # a constant taken by a relative import
    ("pkg/helpers.py", "prec = 28", "prec = 6", True),  # a side effect at import
    ("pkg/helpers.py", "return x\n", "return x + 1\n", False),  # a function the node did not run
    ("pkg/helpers.py", "OTHER = 1", "OTHER = 2", False),  # a constant no code that ran reads
    ("pkg/helpers.py", "return x * SCALE * W", '"""Scaled."""\n    return x * SCALE * W', False),  # a docstring
    ("pkg/helpers.py", "SCALE = 2\n", "SCALE = 2  # why two\n\n", False),  # a comment and a blank line
    ("pkg/nodes.py", "\n", "\r\n", False),  # line endings
]


@pytest.mark.parametrize("path, old, new, changes", EDITS)
def test_an_edit_moves_the_record_only_when_it_changes_what_ran(project, path, old, new, changes):
    ran = record(project, 1.0)
    edit(project, path, old, new)
    found = ran.changes(project, SALT)
    assert bool(found) == changes, found
    if changes:
        assert path in found[0]


def test_files_read_and_env_vars_are_keyed_by_content_and_salted_value(project, monkeypatch):
    data = project / "input.txt"
    data.write_text("abc")
    monkeypatch.setenv("KMRUN_TEST_SHIFT", "1")  # KMRUN_ variables are kmrun's own: never keyed
    monkeypatch.setenv("SHIFT_FOR_TEST", "12345.678")
    edit(project, "pkg/nodes.py", "KMRUN_TEST_SHIFT", "SHIFT_FOR_TEST")
    ran = record(project, 1.0, str(data))
    assert list(ran.files) == ["input.txt"]
    assert list(ran.env) == ["SHIFT_FOR_TEST"] and "12345.678" not in repr(ran)
    assert ran.changes(project, SALT) == []
    data.write_text("abd")
    assert ran.changes(project, SALT) == ["file input.txt changed (the node read it)"]
    data.write_text("abc")
    monkeypatch.setenv("SHIFT_FOR_TEST", "2")
    assert ran.changes(project, SALT) == ["env var SHIFT_FOR_TEST changed (the node read it)"]
    monkeypatch.delenv("SHIFT_FOR_TEST")
    assert ran.changes(project, SALT) == ["env var SHIFT_FOR_TEST changed (the node read it)"]


def test_nothing_is_recorded_outside_a_node_and_writes_are_not_reads(project, tmp_path):
    ran = record(project, 1.0)
    assert ran.files == {}
    recorder = trace.Recorder(project)
    recorder.start()
    recorder.io = True
    with open(tmp_path / "out.txt", "w") as handle:  # a write is an output, not an input
        handle.write("x")
    os.environ.get("HOME")
    ran = recorder.stop(SALT)
    assert ran.files == {} and list(ran.env) == ["HOME"]
    open(tmp_path / "out.txt").read()  # after stop: not recorded anywhere
    assert trace._ACTIVE is None
