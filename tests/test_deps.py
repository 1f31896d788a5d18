"""Node keys follow the project's code across modules: every edit a node can reach moves
its key, and edits it cannot reach (or that change no behaviour) move nothing."""

from __future__ import annotations

import importlib
import sys

import pytest
from kedro.pipeline import Pipeline, node

from runner import deps
from runner.cache import differences, node_keys
from runner.datasets import Catalog

FILES = {
    "src/kmrun_dep_pkg/__init__.py": "",
    "src/kmrun_dep_pkg/helpers.py": (
        "SCALE = 2\n\n\ndef scale(x):\n    return x * SCALE\n\n\ndef unused(x):\n    return x\n"
    ),
    "src/kmrun_dep_pkg/models.py": (
        "class Base:\n    def offset(self):\n        return 1\n\n\n"
        "class Model(Base):\n    factor = 3\n\n    def fit(self, x):\n        return x * self.factor + self.offset()\n"
    ),
    "src/kmrun_dep_pkg/decorators.py": (
        "import functools\n\n\ndef twice(fn):\n    @functools.wraps(fn)\n    def wrapper(*a):\n"
        "        return 2 * fn(*a)\n    return wrapper\n"
    ),
    "src/kmrun_dep_pkg/nodes.py": (
        "import functools\n\nimport kmrun_dep_root\nimport kmrun_dep_sib.util as util\n"
        "from kmrun_dep_pkg import helpers\nfrom kmrun_dep_pkg.decorators import twice\n"
        "from kmrun_dep_pkg.helpers import scale\nfrom kmrun_dep_pkg.models import Model\n\nLOCAL = 10\n\n\n"
        "def prep(raw):\n    return raw + 1\n\n\n"
        "def feat(a):\n    \"\"\"Features.\"\"\"\n    return scale(a) + LOCAL\n\n\n"
        "def train(b, k=5):\n    return Model().fit(b) + k + helpers.SCALE\n\n\n"
        "@twice\ndef evaluate(c):\n    return util.adjust(c) + kmrun_dep_root.BONUS\n\n\n"
        "def _power(x, p):\n    return x ** p\n\n\nsquare = functools.partial(_power, p=2)\n"
    ),
    "src/kmrun_dep_sib/__init__.py": "",
    "src/kmrun_dep_sib/util.py": "def adjust(c):\n    return c - 1\n",
    "kmrun_dep_root.py": "BONUS = 7\n",
    "data/raw.csv": "x\n1\n",
}
MODULES = ("kmrun_dep_pkg", "kmrun_dep_sib", "kmrun_dep_root")
NODES = ("prep", "feat", "train", "evaluate", "square")
AFTER_FEAT, AFTER_TRAIN, AFTER_EVAL = {"feat", "train", "evaluate", "square"}, {"train", "evaluate", "square"}, {
    "evaluate", "square"}

# (what is edited, file, old text, new text, the nodes whose keys must move)
EDITS = [
    ("a constant in the node's module", "src/kmrun_dep_pkg/nodes.py", "LOCAL = 10", "LOCAL = 11", AFTER_FEAT),
    ("a constant in a helper module", "src/kmrun_dep_pkg/helpers.py", "SCALE = 2", "SCALE = 3", AFTER_FEAT),
    ("a helper function in another module", "src/kmrun_dep_pkg/helpers.py", "x * SCALE", "x * SCALE + 0.5", AFTER_FEAT),
    ("a method of a class", "src/kmrun_dep_pkg/models.py", "x * self.factor", "x * self.factor * 2", AFTER_TRAIN),
    ("a method of a base class", "src/kmrun_dep_pkg/models.py", "return 1", "return 2", AFTER_TRAIN),
    ("a class attribute", "src/kmrun_dep_pkg/models.py", "factor = 3", "factor = 4", AFTER_TRAIN),
    ("a default argument", "src/kmrun_dep_pkg/nodes.py", "k=5", "k=6", AFTER_TRAIN),
    ("a decorator", "src/kmrun_dep_pkg/decorators.py", "2 * fn", "3 * fn", AFTER_EVAL),
    ("a sibling package under src/", "src/kmrun_dep_sib/util.py", "c - 1", "c - 2", AFTER_EVAL),
    ("a module at the project root", "kmrun_dep_root.py", "BONUS = 7", "BONUS = 8", AFTER_EVAL),
    ("functools.partial's keywords", "src/kmrun_dep_pkg/nodes.py", "p=2)", "p=3)", {"square"}),
    ("the function behind a partial", "src/kmrun_dep_pkg/nodes.py", "x ** p", "x ** p + 1", {"square"}),
    ("a data file", "data/raw.csv", "x\n1\n", "x\n2\n", set(NODES)),
    # edits no node can reach, or that change no behaviour
    ("a function no node calls", "src/kmrun_dep_pkg/helpers.py", "return x\n", "return x + 1\n", set()),
    ("a comment", "src/kmrun_dep_pkg/helpers.py", "SCALE = 2\n", "SCALE = 2  # the scale\n# more\n", set()),
    ("a docstring", "src/kmrun_dep_pkg/nodes.py", '"""Features."""', '"""Features, scaled."""', set()),
    ("CRLF line endings", "src/kmrun_dep_pkg/nodes.py", "\n", "\r\n", set()),
    ("a new module nothing imports", "src/kmrun_dep_pkg/new.py", "", "X = 1\n", set()),
]


def _import(root):
    for name in [m for m in sys.modules if m.startswith(MODULES)]:
        del sys.modules[name]
    deps.forget()
    importlib.invalidate_caches()
    return importlib.import_module("kmrun_dep_pkg.nodes")


@pytest.fixture
def project(tmp_path, monkeypatch):
    for path, text in FILES.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(text.encode())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(MODULES)]:
        del sys.modules[name]
    deps.forget()


def keys(root):
    nodes = _import(root)
    pipeline = Pipeline([
        node(nodes.prep, "raw", "a", name="prep"), node(nodes.feat, "a", "b", name="feat"),
        node(nodes.train, "b", "c", name="train"), node(nodes.evaluate, "c", "d", name="evaluate"),
        node(nodes.square, "d", "e", name="square"),
    ])
    catalog = Catalog({"raw": {"type": "pandas.CSVDataset", "filepath": "data/raw.csv"}}, root)
    return node_keys(pipeline, {}, catalog, root)


@pytest.mark.parametrize(("what", "path", "old", "new", "expected"), EDITS, ids=[e[0] for e in EDITS])
def test_an_edit_moves_the_keys_of_exactly_the_nodes_it_reaches(project, what, path, old, new, expected):
    before, reasons, _ = keys(project)
    assert not reasons and all(before.values())
    target = project / path
    text = target.read_bytes().decode() if target.exists() else ""
    assert old in text or not text
    target.write_bytes((text.replace(old, new) if text else new).encode())
    after, _, _ = keys(project)
    assert {n for n in NODES if before[n] != after[n]} == expected, what


def test_a_miss_says_what_changed(project):
    _, _, before = keys(project)
    helpers = project / "src/kmrun_dep_pkg/helpers.py"
    helpers.write_text(helpers.read_text().replace("SCALE = 2", "SCALE = 3"))
    _, _, after = keys(project)
    assert differences(before["feat"], after["feat"]) == "code of kmrun_dep_pkg.helpers.SCALE"
    assert differences(before["square"], after["square"]) == "input d (its producer evaluate changed)"


def test_dynamic_code_is_not_coarse_what_it_reaches_is_recorded_when_it_runs(project):
    (project / "src/kmrun_dep_pkg/dyn.py").write_text(
        "import importlib\nimport re\n\n\ndef run(x):\n    return importlib.import_module('kmrun_dep_root').BONUS + x\n"
        "\n\ndef pattern(s):\n    return re.compile('a+').sub('', s)\n")
    _import(project)
    dyn = importlib.import_module("kmrun_dep_pkg.dyn")
    assert deps.reach(dyn.run, project).coarse is None
    assert deps.reach(dyn.pattern, project).coarse is None  # re.compile is not the builtin compile


STATIC = {
    "closures of one factory": ("def make(k):\n    def f(x):\n        return x * k\n    return f\n\n\n"
                                "double = make(2)\ntriple = make(3)\n\n\ndef f(x):\n    return double(x) + triple(x)\n",
                                "f", "make(2)", "make(5)", True),
    "decorator attribute": ("def tag(fn):\n    fn.weight = 2\n    return fn\n\n\n@tag\ndef g(x):\n    return x\n\n\n"
                            "def f(x):\n    return g(x) * g.weight\n", "f", "fn.weight = 2", "fn.weight = 3", True),
    "library decorator around project code": ("import contextlib\n\n\n@contextlib.contextmanager\ndef scope():\n"
                                              "    yield 1\n\n\ndef f(x):\n    with scope() as s:\n        return x + s\n",
                                              "f", "yield 1", "yield 2", True),
    "lambdas in a dict, comment edit": ("OPS = {'a': lambda x: x + 1, 'b': lambda x: x * 2}\n\n\ndef f(x, k):\n"
                                        "    return OPS[k](x)\n", "f", "OPS = {", "# ops\nOPS = {", False),
    "lambdas in a dict, body edit": ("OPS = {'a': lambda x: x + 1, 'b': lambda x: x * 2}\n\n\ndef f(x, k):\n"
                                     "    return OPS[k](x)\n", "f", "x + 1", "x + 2", True),
}


@pytest.mark.parametrize("case", list(STATIC))
def test_the_static_walk_keys_values_a_trace_cannot_see(project, case):
    text, name, old, new, moves = STATIC[case]
    where = project / "src/kmrun_dep_pkg/static.py"
    where.write_text(text)
    _import(project)
    first = deps.reach(getattr(importlib.import_module("kmrun_dep_pkg.static"), name), project).code
    where.write_text(text.replace(old, new))
    _import(project)
    deps.forget()
    second = deps.reach(getattr(importlib.import_module("kmrun_dep_pkg.static"), name), project).code
    assert (first != second) == moves, (first, second)


@pytest.mark.slow
def test_a_set_literal_keys_the_same_in_every_process(project):
    """A set's order follows the hash seed, which differs between processes."""
    import json
    import os
    import subprocess

    (project / "src/kmrun_dep_pkg/static.py").write_text("def f(k):\n    return k in {'alpha', 'beta', 'gamma', 'delta'}\n")
    program = ("import sys, importlib, json; from pathlib import Path; sys.path[:0] = [sys.argv[1] + '/src']; "
               "from runner import deps; m = importlib.import_module('kmrun_dep_pkg.static'); "
               "print(json.dumps(deps.reach(m.f, Path(sys.argv[1])).code))")
    seen = {subprocess.run([sys.executable, "-c", program, str(project)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3, 4)}
    assert len(seen) == 1 and "kmrun_dep_pkg.static.f" in json.loads(seen.pop())


def test_a_project_folder_named_data_or_build_is_the_projects_code(project):
    for folder in ("data", "build", "dist"):
        (project / "src/kmrun_dep_pkg" / folder).mkdir(exist_ok=True)
        (project / "src/kmrun_dep_pkg" / folder / "__init__.py").write_text("def f(x):\n    return x\n")
    _import(project)
    for folder in ("data", "build", "dist"):
        module = importlib.import_module(f"kmrun_dep_pkg.{folder}")
        assert f"kmrun_dep_pkg.{folder}.f" in deps.reach(module.f, project).code


def test_imports_inside_a_function_are_followed_relative_or_not(project):
    (project / "src/kmrun_dep_pkg/late.py").write_text(
        "def relative(x):\n    from .helpers import scale\n    return scale(x)\n\n\n"
        "def absolute(x):\n    import kmrun_dep_sib.util\n    return kmrun_dep_sib.util.adjust(x)\n")
    _import(project)
    late = importlib.import_module("kmrun_dep_pkg.late")
    assert {"kmrun_dep_pkg.helpers.scale", "kmrun_dep_pkg.helpers.SCALE"} <= set(deps.reach(late.relative, project).code)
    assert "kmrun_dep_sib.util.adjust" in deps.reach(late.absolute, project).code


def test_installed_libraries_are_keyed_by_their_version(project):
    (project / "src/kmrun_dep_pkg/fit.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n\n\ndef make(c):\n    return LogisticRegression(C=c)\n")
    nodes = _import(project)
    reach = deps.reach(importlib.import_module("kmrun_dep_pkg.fit").make, project)
    assert reach.dists["scikit-learn"].split()[0] == importlib.metadata.version("scikit-learn")
    assert {"numpy", "scipy"} <= set(reach.dists)  # what scikit-learn requires
    assert "kmrun_dep_pkg.nodes.LOCAL" in deps.reach(nodes.feat, project).code
