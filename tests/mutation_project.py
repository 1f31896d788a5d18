"""A Kedro project written the way users write them, for the node cache's difference test
(tests/test_cache_mutations.py): library decorators, imports inside functions, classes named
in YAML, runtime params, typed params, a custom dataset, a custom resolver, globals, files
read by path and environment variables. Each ``p_*`` node exercises one pattern and feeds
one metric, so that an edit moves exactly the metrics of the nodes it reaches."""

from __future__ import annotations

NODES = '''import functools
import os
import re
from decimal import Decimal
from importlib import import_module as grab
from pathlib import Path

import kmrun_edlib
import kmrun_tinylib
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from kedro.utils import load_obj

import mutp.weights as weights
from mutp import lazymod
from mutp.api import Estimator
from mutp.data.prep import prepare
from mutp.decorators import logged, weighted
from mutp.dispatch import describe, scope
from mutp.factory import double, triple
from mutp.helpers import cached_rate, clip, make_model, square
from mutp.models import Counted, Plugin
from mutp.ops import OPS
from mutp.options import ModelOptions
from mutp.plugins import DEFAULT, Unit
from mutp_sib.adjust import adjust

OFFSET = 0.25
UCLIP = np.frompyfunc(clip, 1, 1)
EXTRAS = Path(__file__).resolve().parents[2] / "data" / "extras"


def load(raw):
    return list(raw)


def clean(values, clean):
    return [v * clean["scale"] + clean["offset"] + clean["k"] + clean["seed"] / 100 for v in values]


def features(cleaned):
    return pd.DataFrame({"v": cleaned}, index=range(10, 10 + len(cleaned)))


@logged
def train(feats: pd.DataFrame, model: ModelOptions, shift=0.0):
    fitted = make_model(model.alpha)
    return fitted.fit(list(feats["v"])) + model.beta + model.gamma + OFFSET + shift + weights.W * kmrun_tinylib.FACTOR


def evaluate(coef, feats):
    return adjust(coef) / len(feats)


def layout(feats):
    return float(feats.index[0]) + float((feats["v"] / 3).sum())


def p_dispatch(feats):
    return describe(1.5)


def p_context(feats):
    with scope() as s:
        return s * 2


@np.errstate(divide="ignore")
def p_errstate(feats):
    return float(np.log(np.array([0.0, 2.0]))[1]) * 3


def p_lazy(feats):
    from mutp.lazy import value

    return value()


def p_load_obj(feats, plugin):
    return load_obj(plugin["cls"])().apply(2.0)


def p_instantiate(feats, plugin):
    return instantiate(plugin["target"]).apply(2.0)


def p_import_module(feats, plugin):
    return grab(plugin["module"]).helper(3.0)


def p_closure(feats):
    return double(1.0) + triple(1.0)


@weighted
def scaled(x):
    return x


def p_attribute(feats):
    return scaled(1.0) * scaled.weight


def p_reexport(feats):
    return Estimator().score()


def p_meta(feats):
    return Counted().value + Counted.BASE


def p_subclasses(feats):
    return sum(c().weight() for c in Plugin.__subclasses__())


def p_getattr(feats):
    return lazymod.VALUE


def p_frompyfunc(feats):
    return float(UCLIP(np.array([5.0]))[0])


def p_decimal(feats):
    return float(Decimal(1) / Decimal(7))


def p_editable(feats):
    return kmrun_edlib.factor()


def p_file(feats):
    return float((EXTRAS / "a.txt").read_text().strip())


def p_listing(feats):
    return float(len(list(EXTRAS.glob("*.txt"))))


def p_env(feats):
    return float(os.environ.get("MUT_SHIFT", "0"))


def p_data_package(feats):
    return prepare(1.0)


def p_set(feats):
    return float(sum(1 for k in ("a", "x", "c") if k in {"a", "b", "c"}))


def p_regex(feats):
    return float(len(re.compile(r"[0-9]+").findall("a1b22c333")))


def p_lambda(feats):
    return OPS["inc"](1.0) + OPS["dbl"](2.0)


def p_cached(feats):
    return cached_rate()


def p_nested(feats):
    def inner(x):
        return x * 3

    return inner(1.0)


def p_members(feats):
    return Unit.make().area + Unit.size()


def p_partial(feats):
    return square(3.0)


def p_instance(feats):
    return DEFAULT.apply(1.0)


def report(**parts):
    return {name: float(value) for name, value in parts.items()}
'''

PATTERNS = {  # node -> its extra inputs
    "p_dispatch": [], "p_context": [], "p_errstate": [], "p_lazy": [], "p_load_obj": ["params:plugin"],
    "p_instantiate": ["params:plugin"], "p_import_module": ["params:plugin"], "p_closure": [], "p_attribute": [],
    "p_reexport": [], "p_meta": [], "p_subclasses": [], "p_getattr": [], "p_frompyfunc": [], "p_decimal": [],
    "p_editable": [], "p_file": [], "p_listing": [], "p_env": [], "p_data_package": [], "p_set": [], "p_regex": [],
    "p_lambda": [], "p_cached": [], "p_nested": [], "p_members": [], "p_partial": [], "p_instance": [],
}

PIPELINE = '''from kedro.pipeline import Pipeline, node

from mutp import nodes

PATTERNS = {patterns!r}


def register_pipelines():
    steps = [
        node(nodes.load, "raw", "values", name="load"),
        node(nodes.clean, ["values", "params:clean"], "cleaned", name="clean"),
        node(nodes.features, "cleaned", "feats", name="features"),
        node(nodes.train, ["feats", "params:model"], "coef", name="train"),
        node(nodes.evaluate, ["coef", "feats"], "score", name="evaluate"),
        node(nodes.layout, "feats", "layout", name="layout"),
    ]
    steps += [node(getattr(nodes, name), ["feats", *extra], f"{name}_out", name=name) for name, extra in PATTERNS.items()]
    parts = {"score": "score", "layout": "layout", **{name: f"{name}_out" for name in PATTERNS}}
    steps.append(node(nodes.report, parts, "metrics", name="report"))
    return {"__default__": Pipeline(steps)}
'''.replace("{patterns!r}", repr(PATTERNS))

FILES = {
    "src/mutp/__init__.py": "from mutp import sideeffect  # noqa: F401  (decimal's precision, set at import)\n",
    "src/mutp/sideeffect.py": "import decimal\n\ndecimal.getcontext().prec = 6\n",
    "src/mutp/hooks.py": "from pathlib import Path\n\nfrom kedro.framework.hooks import hook_impl\n\n\nclass RunLog:\n"
                         "    @hook_impl\n    def after_pipeline_run(self, run_params):\n"
                         "        with open(Path(run_params['project_path']) / 'data' / 'pipeline_runs.txt', 'a') as log:\n"
                         "            log.write(run_params['run_id'] + '\\n')\n",
    "src/mutp/settings.py": 'from mutp.hooks import RunLog\nfrom mutp.resolvers import twice\n\nHOOKS = (RunLog(),)\nCONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local", "custom_resolvers": {"twice": twice}}\n',
    "src/mutp/resolvers.py": "def twice(x):\n    return float(x) * 2\n",
    "src/mutp/nodes.py": NODES,
    "src/mutp/options.py": "from dataclasses import dataclass\n\n\n@dataclass\nclass ModelOptions:\n    alpha: float\n"
                           "    beta: float = 1.0\n    gamma: float = 0.0\n",
    "src/mutp/parsing.py": "def parse_line(line):\n    return float(line.strip()) * 1.0\n",
    "src/mutp/datasets.py": "from pathlib import Path\n\nfrom kedro.io import AbstractDataset\n\nfrom mutp.parsing import parse_line"
                            "\n\n\nclass NumbersDataset(AbstractDataset):\n    def __init__(self, filepath):\n"
                            "        self._filepath = Path(filepath)\n\n    def load(self):\n        return [parse_line(x) "
                            "for x in self._filepath.read_text().splitlines() if x.strip()]\n\n    def save(self, data):\n"
                            "        raise NotImplementedError\n\n    def _describe(self):\n"
                            "        return {'filepath': str(self._filepath)}\n",
    "src/mutp/helpers.py": "import functools\n\nfrom mutp.models import Model\n\nSCALE = 2.0\nUNUSED_RATE = 1\n\n\n"
                           "def make_model(alpha):\n    return Model(alpha * SCALE)\n\n\ndef clip(x):\n    return min(x, 3.0)\n\n\n"
                           "@functools.lru_cache\ndef cached_rate():\n    return 0.5\n\n\n"
                           "def _power(x, p):\n    return x ** p\n\n\nsquare = functools.partial(_power, p=2)\n\n\n"
                           "def unused():\n    return 1\n",
    "src/mutp/models.py": "class Base:\n    def bias(self):\n        return 1.0\n\n\nclass Model(Base):\n"
                          "    def __init__(self, alpha):\n        self.alpha = alpha\n\n"
                          "    def fit(self, xs):\n        return sum(xs) * self.alpha + self.bias()\n\n\n"
                          "class Ridge:\n    def score(self):\n        return 0.5\n\n\n"
                          "class Lasso:\n    def score(self):\n        return 0.25\n\n\n"
                          "class Meta(type):\n    def __call__(cls, *args, **kwargs):\n"
                          "        obj = super().__call__(*args, **kwargs)\n        obj.value = 7.0\n        return obj\n\n\n"
                          "class Counted(metaclass=Meta):\n    BASE = 1.0\n\n\n"
                          "class Plugin:\n    pass\n\n\nclass First(Plugin):\n    def weight(self):\n        return 1.125\n\n\n"
                          "class Second(Plugin):\n    def weight(self):\n        return 2.25\n",
    "src/mutp/api.py": "from mutp.models import Ridge as Estimator  # re-exported\n\n__all__ = ['Estimator']\n",
    "src/mutp/decorators.py": "import functools\n\n\ndef logged(fn):\n    @functools.wraps(fn)\n"
                              "    def wrapper(*args, **kwargs):\n        return fn(*args, **kwargs) * 1.0\n"
                              "    return wrapper\n\n\ndef weighted(fn):\n    fn.weight = 2.0\n    return fn\n",
    "src/mutp/dispatch.py": "import contextlib\nimport functools\n\n\n@functools.singledispatch\ndef describe(value):\n"
                            "    return 0.0\n\n\n@describe.register\ndef _(value: float):\n    return value * 2\n\n\n"
                            "@contextlib.contextmanager\ndef scope():\n    yield 3.0\n",
    "src/mutp/factory.py": "def make(k):\n    def scaled(x):\n        return x * k\n\n    return scaled\n\n\n"
                           "double = make(2)\ntriple = make(3)\n",
    "src/mutp/lazy.py": "def value():\n    return 5.0\n",
    "src/mutp/lazymod.py": "def __getattr__(name):\n    if name == 'VALUE':\n        return 4.0\n    raise AttributeError(name)\n",
    "src/mutp/plugins.py": "class Scaler:\n    def apply(self, x):\n        return x * 1.5\n\n\n"
                           "class Tripler:\n    def apply(self, x):\n        return x * 3\n\n\n"
                           "class Shifter:\n    def __init__(self, by):\n        self.by = by\n\n"
                           "    def apply(self, x):\n        return x + self.by\n\n\n"
                           "class Unit:\n    @staticmethod\n    def size():\n        return 1.0\n\n    @classmethod\n"
                           "    def make(cls):\n        return cls()\n\n    @property\n    def area(self):\n        return 2.0\n\n\n"
                           "def helper(x):\n    return x * 10\n\n\nDEFAULT = Shifter(1.0)\n",
    "src/mutp/ops.py": "OPS = {'inc': lambda x: x + 1, 'dbl': lambda x: x * 2}\n",
    "src/mutp/data/__init__.py": "",
    "src/mutp/data/prep.py": "def prepare(x):\n    return x + 0.125\n",
    "src/mutp/weights.py": "W = 0.5\n",
    "src/mutp_sib/__init__.py": "",
    "src/mutp_sib/adjust.py": "def adjust(v):\n    return v + 3.0\n",
    "conf/base/globals.yml": "offset: 1.5\n",
    "conf/prod/parameters.yml": "model:\n  alpha: 0.3\n",
    "data/raw.txt": "".join(f"{i}\n" for i in range(1, 21)),
    "data/extras/a.txt": "2.5\n",
    "data/extras/b.txt": "1\n",
}

PARAMETERS = """clean:
  scale: 1.0
  seed: ${runtime_params:seed, 42}
  offset: ${globals:offset}
  k: ${twice:3}
model:
  alpha: 0.1
  beta: 1.0
plugin:
  cls: mutp.plugins.Scaler
  target:
    _target_: mutp.plugins.Shifter
    by: 2.0
  module: mutp.plugins
"""

CATALOG = {
    "raw": {"type": "mutp.datasets.NumbersDataset", "filepath": "data/raw.txt"},
    "feats": {"type": "pandas.CSVDataset", "filepath": "data/02_intermediate/feats.csv",
              "save_args": {"index": False}, "load_args": {"dtype": "float32"}},
}

KMRUN = {"objective": {"metric": "score", "direction": "maximize"}, "metrics": ["metrics"]}

P = set(PATTERNS)
ALL = {"load", "clean", "features", "train", "evaluate", "layout", "report", *P}
AFTER_CLEAN = ALL - {"load"}
AFTER_FEATS = ALL - {"load", "clean", "features"}
TRAIN = {"train", "evaluate", "report"}


def only(*nodes: str) -> set[str]:
    return {*nodes, "report"}


# (what, file or a special action, old, new, extra kmrun arguments, nodes that must run again, whether it moves the result)
# Edits apply one after another; an edit with extra arguments is not kept for the next one.
EDITS = [
    ("constant in the node's module", "src/mutp/nodes.py", "OFFSET = 0.25", "OFFSET = 0.75", (), TRAIN, True),
    ("helper-module function", "src/mutp/helpers.py", "alpha * SCALE", "alpha * SCALE + 0.01", (), TRAIN, True),
    ("constant in a helper module", "src/mutp/helpers.py", "SCALE = 2.0", "SCALE = 3.0", (), TRAIN, True),
    ("method of a class", "src/mutp/models.py", "* self.alpha +", "* self.alpha * 1.5 +", (), TRAIN, True),
    ("method of a base class", "src/mutp/models.py", "return 1.0\n", "return 2.0\n", (), TRAIN, True),
    ("decorator", "src/mutp/decorators.py", "* 1.0", "* 1.1", (), TRAIN, True),
    ("default argument", "src/mutp/nodes.py", "shift=0.0", "shift=0.5", (), TRAIN, True),
    ("sibling package under src/", "src/mutp_sib/adjust.py", "v + 3.0", "v + 4.0", (), only("evaluate"), True),
    ("import module + module.attr", "src/mutp/weights.py", "W = 0.5", "W = 0.7", (), TRAIN, True),
    ("installed distribution's version", "pip:tinylib", None, "2.0", (), TRAIN, True),
    ("data file", "data/raw.txt", "1\n2\n", "5\n2\n", (), ALL, True),
    ("catalog load_args", "conf/base/catalog.yml", "float32", "float64", (), AFTER_FEATS | {"features"}, True),
    ("catalog load_args back: the entries made before are valid again", "conf/base/catalog.yml", "float64", "float32",
     (), set(), True),
    ("Kedro env", None, None, None, ("kedro.env=prod",), TRAIN, True),
    ("singledispatch implementation", "src/mutp/dispatch.py", "value * 2", "value * 3", (), only("p_dispatch"), True),
    ("contextmanager body", "src/mutp/dispatch.py", "yield 3.0", "yield 4.0", (), only("p_context"), True),
    ("node under @np.errstate", "src/mutp/nodes.py", "[1]) * 3", "[1]) * 4", (), only("p_errstate"), True),
    ("package folder named data", "src/mutp/data/prep.py", "x + 0.125", "x + 0.5", (), only("p_data_package"), True),
    ("module imported in a node's body", "src/mutp/lazy.py", "5.0", "6.0", (), only("p_lazy"), True),
    ("class named by a param, load_obj", "src/mutp/plugins.py", "x * 1.5", "x * 2.5", (), only("p_load_obj"), True),
    ("class named by _target_, instantiate", "src/mutp/plugins.py", "x + self.by", "x + self.by * 2", (),
     only("p_instantiate", "p_instance"), True),
    ("module named by a param, import_module as", "src/mutp/plugins.py", "x * 10", "x * 20", (),
     only("p_import_module"), True),
    ("class named by a param: YAML names another", "conf/base/parameters.yml", "mutp.plugins.Scaler",
     "mutp.plugins.Tripler", (), only("p_load_obj"), True),
    ("the first of two closures of a factory", "src/mutp/factory.py", "double = make(2)", "double = make(5)", (),
     only("p_closure"), True),
    ("attribute a decorator sets", "src/mutp/decorators.py", "fn.weight = 2.0", "fn.weight = 3.0", (),
     only("p_attribute"), True),
    ("re-exported name switched to another class", "src/mutp/api.py", "Ridge as", "Lasso as", (),
     only("p_reexport"), True),
    ("metaclass __call__", "src/mutp/models.py", "obj.value = 7.0", "obj.value = 8.0", (), only("p_meta"), True),
    ("class attribute", "src/mutp/models.py", "BASE = 1.0", "BASE = 1.5", (), only("p_meta"), True),
    ("class found through __subclasses__()", "src/mutp/models.py", "return 2.25", "return 2.75", (),
     only("p_subclasses"), True),
    ("PEP 562 module __getattr__", "src/mutp/lazymod.py", "return 4.0", "return 4.5", (), only("p_getattr"), True),
    ("helper wrapped by np.frompyfunc", "src/mutp/helpers.py", "min(x, 3.0)", "min(x, 4.0)", (),
     only("p_frompyfunc"), True),
    ("import-time side effect", "src/mutp/sideeffect.py", "prec = 6", "prec = 9", (), only("p_decimal"), True),
    ("editable install outside the project", "edlib", "return 1.5", "return 2.5", (), only("p_editable"), True),
    ("helper a dataset class's load() calls", "src/mutp/parsing.py", "* 1.0", "* 2.0", (), ALL, True),
    ("runtime param in parameters.yml, swept", None, None, None, ("-m", "+params.seed=1,2"), AFTER_CLEAN, True),
    ("typed param: YAML edit while a grid sets another field", "conf/base/parameters.yml", "beta: 1.0", "beta: 2.0",
     ("-m", "params.model.alpha=0.1,0.2"), TRAIN, True),
    ("typed param: a dataclass default", "src/mutp/options.py", "gamma: float = 0.0", "gamma: float = 0.5", (),
     TRAIN, True),
    ("CSV saved without its index, producer served", "src/mutp/nodes.py", "float(feats.index[0]) +",
     "float(feats.index[0] + 1) +", (), only("layout"), True),
    ("load_args dtype, producer served", "src/mutp/nodes.py", '(feats["v"] / 3)', '(feats["v"] / 7)', (),
     only("layout"), True),
    ("file a node reads by path", "data/extras/a.txt", "2.5", "3.5", (), only("p_file"), True),
    ("file added to a folder a node lists", "data/extras/c.txt", None, "3\n", (), only("p_listing"), True),
    ("env var a node reads, set", "env:MUT_SHIFT", None, "1", (), only("p_env"), True),
    ("env var a node reads, changed", "env:MUT_SHIFT", None, "2", (), only("p_env"), True),
    ("parameter value", "conf/base/parameters.yml", "scale: 1.0", "scale: 2.0", (), AFTER_CLEAN, True),
    ("globals.yml value", "conf/base/globals.yml", "offset: 1.5", "offset: 2.5", (), AFTER_CLEAN, True),
    ("custom resolver's code", "src/mutp/resolvers.py", "float(x) * 2", "float(x) * 3", (), AFTER_CLEAN, True),
    ("lambda in a dict", "src/mutp/ops.py", "x + 1", "x + 2", (), only("p_lambda"), True),
    ("functools.lru_cache helper", "src/mutp/helpers.py", "return 0.5", "return 0.75", (), only("p_cached"), True),
    ("function nested in a node", "src/mutp/nodes.py", "return x * 3\n", "return x * 4\n", (), only("p_nested"), True),
    ("staticmethod body", "src/mutp/plugins.py", "return 1.0", "return 1.25", (), only("p_members"), True),
    ("property body", "src/mutp/plugins.py", "return 2.0", "return 2.5", (), only("p_members"), True),
    ("functools.partial keyword", "src/mutp/helpers.py", "p=2)", "p=3)", (), only("p_partial"), True),
    ("the function behind a partial", "src/mutp/helpers.py", "x ** p", "x ** p + 1", (), only("p_partial"), True),
    ("module-level object's state", "src/mutp/plugins.py", "Shifter(1.0)", "Shifter(1.25)", (),
     only("p_instance"), True),
    # edits that change no result: nothing may run again
    ("comment only", "src/mutp/helpers.py", "SCALE = 3.0\n", "SCALE = 3.0  # why three\n", (), set(), False),
    ("function no node calls", "src/mutp/helpers.py", "return 1\n", "return 2\n", (), set(), False),
    ("CRLF line endings", "src/mutp/nodes.py", "\n", "\r\n", (), set(), False),
    ("comment in a module that holds lambdas", "src/mutp/ops.py", "OPS = ", "# the operations\nOPS = ", (), set(),
     False),
    ("docstring", "src/mutp/nodes.py", "def evaluate(coef, feats):", 'def evaluate(coef, feats):\r\n    """The score."""',
     (), set(), False),
    ("constant no code that ran reads", "src/mutp/helpers.py", "UNUSED_RATE = 1", "UNUSED_RATE = 2", (), set(), False),
    ("reformatted expression", "src/mutp/dispatch.py", "    return 0.0\n", "    return (\n        0.0\n    )\n", (),
     set(), False),
    ("new module nothing imports", "src/mutp/new.py", None, "X = 1\n", (), set(), False),
    ("unselected registry entry", "src/mutp/pipeline_registry.py", 'return {"__default__": Pipeline(steps)}',
     'return {"__default__": Pipeline(steps), "other": Pipeline([node(nodes.features, "cleaned", "f2", name="f2")])}',
     (), set(), False),
    ("nothing (a set literal and re.compile, in a new process)", None, None, None, (), set(), False),
    ("a test file in the project", "tests/test_nodes.py", None, "def test_x():\n    assert True\n", (), set(), False),
]
