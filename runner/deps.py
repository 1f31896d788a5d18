"""What a node's result can depend on: the project's own code its function reaches, and
the installed distributions that code uses.

The walk starts at a node's function and follows, transitively, everything the code
names: functions and classes (their methods, base classes, class attributes) in any
module that lives in the project folder (its package, sibling packages under ``src/``,
modules at its root), module-level constants and objects (by value), modules used as
``module.attr``, closures, decorators, ``functools.partial`` and default arguments. Code is
hashed as compiled bytecode, so comments, blank lines, docstrings and line endings do not
count. Code from an installed distribution is keyed by the distribution's version (and
those of the distributions it requires); the standard library by the Python version.

The walk is what kmrun can know before a node runs; what the node reaches only at run time
(a class named in YAML, a module imported in its body, a ``singledispatch`` branch) is
recorded while it runs (``trace``). A function that calls ``getattr``, ``globals()`` or
``vars()`` reaches every attribute of the project modules it names (and of its own module).
A library decorator's wrapper is followed through ``__wrapped__`` to the project's function.
An editable install outside the project is keyed by its source files, not its version.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import importlib.util
import os
import pickle
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dists
from .dists import distributions

WIDE = ("getattr", "globals", "vars")  # any attribute of the modules the code names may be read
SKIPPED_DIRS = {"site-packages", "dist-packages", "node_modules", "__pycache__"}  # never the project's own code
PLAIN = (type(None), bool, int, float, complex, str, bytes)


@dataclass
class Reach:
    """Everything one callable reaches: digests of the project's code it runs (by qualified
    name), the installed distributions it uses (by name: version), and why it was keyed
    by the whole project's code, when it was."""

    code: dict[str, str] = field(default_factory=dict)
    dists: dict[str, str] = field(default_factory=dict)
    coarse: str | None = None

    def parts(self, root: Path) -> dict[str, str]:
        """Named digests for a key: ``code NAME``, ``dist NAME``, ``python``, and the whole
        project's code when the walk was coarse."""
        out = {f"code {name}": digest for name, digest in self.code.items()}
        out.update({f"dist {name}": version for name, version in self.dists.items()})
        out["python"] = sys.version
        if self.coarse is not None:
            out["code (whole project)"] = project_code(root)
        return out

    def merge(self, other: Reach) -> None:
        self.code.update(other.code)
        self.dists.update(other.dists)
        self.coarse = self.coarse or other.coarse


class _Walk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.reach = Reach()
        self.seen: set[int] = set()
        self.modules: set[tuple[str, frozenset[str] | None]] = set()
        self.kept: list[Any] = []  # what ``seen`` holds the ids of, alive for the walk

    def value(self, obj: Any, depth: int = 0) -> None:
        """Walk anything a function can reach: code to follow, or data holding code."""
        if isinstance(obj, PLAIN) or depth > 20 or id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        self.kept.append(obj)
        if isinstance(obj, types.FunctionType):
            self.function(obj)
        elif isinstance(obj, type):
            self.klass(obj)
        elif isinstance(obj, functools.partial):
            for item in (obj.func, *obj.args, *obj.keywords.values()):
                self.value(item, depth + 1)
        elif isinstance(obj, types.MethodType):
            self.value(obj.__func__, depth + 1)
            self.value(obj.__self__, depth + 1)
        elif isinstance(obj, staticmethod | classmethod):
            self.value(obj.__func__, depth + 1)
        elif isinstance(obj, property):
            for item in (obj.fget, obj.fset, obj.fdel):
                self.value(item, depth + 1)
        elif isinstance(obj, types.ModuleType):
            self.installed(obj.__name__)
        elif isinstance(obj, types.BuiltinFunctionType | types.BuiltinMethodType):
            module = getattr(obj, "__module__", None) or "builtins"
            where = getattr(sys.modules.get(module), "__file__", None)
            if where and self.own(module):  # the project's own C extension: no trace sees inside it
                self.reach.code[f"module {module}"] = _file_digest(Path(where))
                self.reach.coarse = self.reach.coarse or f"{module} is a C extension of the project"
            else:
                self.installed(module)
        elif isinstance(obj, list | tuple | set | frozenset):
            for item in obj:
                self.value(item, depth + 1)
        elif isinstance(obj, dict):
            for key, item in obj.items():
                self.value(key, depth + 1)
                self.value(item, depth + 1)
        else:  # an object: its class's code, and what it holds (an installed class may hold the project's code)
            self.value(type(obj), depth + 1)
            try:
                wrapped, state = getattr(obj, "__wrapped__", None), getattr(obj, "__dict__", None)
            except Exception:  # an object that cannot be looked into: the whole project's code stands in
                self.reach.coarse = self.reach.coarse or f"a {type(obj).__qualname__} object cannot be inspected"
                return
            if wrapped is not None:
                self.value(wrapped, depth + 1)
            if isinstance(state, dict):
                self.value(state, depth + 1)

    def function(self, fn: types.FunctionType) -> None:
        code = fn.__code__
        module = fn.__globals__.get("__name__") or fn.__module__ or ""  # functools.wraps copies __module__
        wrapped = getattr(fn, "__wrapped__", None)
        if not self.own(module):
            self.installed(module)
            if wrapped is not None:  # a library's decorator (functools.wraps): the project's function inside
                self.value(wrapped)
            for item in (fn.__closure__ or ()):  # a library's wrapper made around project code
                try:
                    self.value(item.cell_contents)
                except ValueError:
                    continue
            return
        name = f"{module}.{code.co_qualname}"
        doc = fn.__doc__ if code.co_consts and code.co_consts[0] == fn.__doc__ else None
        attrs = {k: v for k, v in vars(fn).items() if k != "__wrapped__"}  # set by a decorator
        self._add(name, _digest([_code_digest(code, skip_doc=doc is not None), _stable(fn.__defaults__, fn),
                                 _stable(fn.__kwdefaults__, fn), _stable(attrs, fn) if attrs else ""]))
        if attrs:
            self.value(attrs)
        for item in (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()):
            self.value(item)
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if not _is_code(contents):
                self._add(f"{name}.<closure {code.co_freevars[i]}>", _stable(contents, fn))
            self.value(contents)
        if wrapped is not None:
            self.value(wrapped)
        names, imports = _names(code)
        scope = fn.__globals__
        wide = any(n in names and n not in scope for n in WIDE)
        for imported, level in imports:
            if level:  # a relative import inside the function
                package = scope.get("__package__") or module.rpartition(".")[0]
                imported = importlib.util.resolve_name("." * level + imported, package)
            found = sys.modules.get(imported)
            if found is not None:
                self.module(found, None if wide else names)
        if wide and module in sys.modules:
            self.module(sys.modules[module], None)
        for used in sorted(names):
            if used in scope:
                self.global_(scope[used], module, used, None if wide else names)

    def _add(self, name: str, digest: str) -> None:
        """One named part; two functions of one name (closures of one factory) both count."""
        before = self.reach.code.get(name)
        if before is not None and before != digest:
            digest = _digest(sorted({before, digest}))
        self.reach.code[name] = digest

    def global_(self, obj: Any, module: str, name: str, names: set[str] | None) -> None:
        """A module-level name a function reads: followed if it is code, hashed by value if
        it is data."""
        if isinstance(obj, types.ModuleType):
            self.module(obj, names)
            return
        if not _is_code(obj) and self.own(module):
            self.reach.code[f"{module}.{name}"] = _stable(obj, sys.modules.get(module))
        self.value(obj)

    def module(self, module: types.ModuleType, names: set[str] | None) -> None:
        """A module used as ``module.attr``: the attributes the code names (all of them
        when ``names`` is None)."""
        if not self.own(module.__name__):
            self.installed(module.__name__)
            return
        slot = (module.__name__, frozenset(names) if names is not None else None)
        if slot in self.modules:
            return
        self.modules.add(slot)
        for attr, member in sorted(vars(module).items()):
            if (attr in names if names is not None else not attr.startswith("__")):
                self.global_(member, module.__name__, attr, names)

    def klass(self, cls: type) -> None:
        module = cls.__module__ or ""
        if not self.own(module):
            self.installed(module)
            return
        parts = []
        for attr, member in sorted(vars(cls).items()):
            if attr in ("__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__firstlineno__",
                        "__static_attributes__"):
                continue
            code_like = isinstance(member, types.FunctionType | staticmethod | classmethod | property
                                   | functools.partial | type)
            if code_like:
                parts.append(attr)
                self.value(member)
            elif not attr.startswith("__"):
                parts.append(f"{attr}={_stable(member, sys.modules.get(module))}")
                self.value(member)
        for base in cls.__mro__[1:]:
            parts.append(f"{base.__module__}.{base.__qualname__}")
            self.value(base)
        self.reach.code[f"{module}.{cls.__qualname__}"] = _digest(parts)

    def installed(self, module: str) -> None:
        """Code from outside the project: its distribution's version, or the file's content
        when it belongs to none (Python's own modules go with the Python version)."""
        top = module.split(".")[0]
        if not top or top in sys.stdlib_module_names or top in ("builtins", "__main__"):
            return
        found = distributions(top)
        if found:
            self.reach.dists.update(found)
            return
        where = getattr(sys.modules.get(top), "__file__", None)
        self.reach.code[f"module {top}"] = _file_digest(Path(where)) if where else "unknown"

    def imports_of(self, module: str) -> None:
        """The installed distributions a module's globals come from."""
        found = sys.modules.get(module)
        for value in list(vars(found).values()) if found is not None else []:
            if isinstance(value, types.ModuleType):
                self.installed(value.__name__)
                continue
            try:
                where = value.__module__ if not isinstance(value, PLAIN) else None
            except Exception:  # a lazy object that cannot say
                continue
            if isinstance(where, str) and not self.own(where):
                self.installed(where)

    def own(self, module: str) -> bool:
        return _own(self.root, module)


def reach(obj: Any, root: Path) -> Reach:
    """What ``obj`` (a node's function, a hook, a dataset class) reaches, memoized per process."""
    slot = (id(obj), root)
    hit = _MEMO.get(slot)
    if hit is not None and hit[0] is obj:
        return hit[1]
    walk = _Walk(root)
    if not isinstance(obj, types.FunctionType | type):  # a partial, a bound method, a callable object
        walk.reach.code[f"<{type(obj).__qualname__} object>"] = _stable(obj)
    walk.value(obj)
    if isinstance(obj, type) and not walk.own(obj.__module__):  # an installed dataset class: what it imports
        walk.imports_of(obj.__module__)
    _MEMO[slot] = (obj, walk.reach)
    return walk.reach


_MEMO: dict[tuple[int, Path], tuple[Any, Reach]] = {}


def forget() -> None:
    """Drop what was memoized (code may have been reloaded since)."""
    _MEMO.clear()
    _OWN.clear()
    dists.forget()
    _ENVIRONMENTS.clear()
    project_code.cache_clear()


def _own(root: Path, module: str) -> bool:
    """Whether ``module`` is the project's own code: a file under ``root`` that is not
    in an environment's site-packages."""
    hit = _OWN.get((root, module))
    if hit is not None:
        return hit
    where = getattr(sys.modules.get(module), "__file__", None)
    if not where:
        return False
    path = Path(os.path.realpath(where))
    own = path.is_relative_to(root) and not any(
        part in SKIPPED_DIRS or part.startswith(".") for part in path.relative_to(root).parts[:-1])
    _OWN[(root, module)] = own
    return own


_OWN: dict[tuple[Path, str], bool] = {}


@functools.cache
def project_code(root: Path) -> str:
    """Every Python file of the project (its package, sibling packages, root modules)."""
    files = []
    for where, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")
                         and not (Path(where, d) / "pyvenv.cfg").exists())
        files += [Path(where, n) for n in sorted(names) if n.endswith(".py")]
    return _digest(f"{p.relative_to(root)}:{_file_digest(p)}" for p in files)


def _names(code: types.CodeType) -> tuple[set[str], set[tuple[str, int]]]:
    """The names a code object (and the code nested in it) reads, and the modules it
    imports (name, and level: 1 for ``from . import``)."""
    names: set[str] = set()
    imports: set[tuple[str, int]] = set()
    todo = [code]
    while todo:
        current = todo.pop()
        names.update(current.co_names)
        todo += [c for c in current.co_consts if isinstance(c, types.CodeType)]
        if IMPORT_NAME in current.co_code[::2]:  # cheap test before disassembling
            level = 0
            for op in dis.get_instructions(current):
                if op.opname == "LOAD_CONST" and isinstance(op.argval, int):
                    level = op.argval  # the import's level is loaded two instructions before it
                elif op.opname == "IMPORT_NAME":
                    imports.add((op.argval, level))
    for imported, _ in imports:
        names.update(n for n in imported.split(".") if n)
    return names, imports


IMPORT_NAME = dis.opmap["IMPORT_NAME"]
NOP = dis.opmap["NOP"]


def _is_code(obj: Any) -> bool:
    """Code the walk follows by name; anything else (data, partials, objects) is hashed by value."""
    return isinstance(obj, types.FunctionType | type | types.ModuleType | types.BuiltinFunctionType
                      | staticmethod | classmethod | property)


def _code_digest(code: types.CodeType, skip_doc: bool = False) -> str:
    """Compiled code without what formatting changes: a docstring reads as no docstring (None,
    as a function without one has), and the NOPs that keep line events of an expression
    spread over several lines are left out."""
    consts = (None, *code.co_consts[1:]) if skip_doc else code.co_consts
    raw = code.co_code
    ops = b"".join(raw[i:i + 2] for i in range(0, len(raw), 2) if raw[i] != NOP)
    parts = [code.co_name, ops.hex(), ",".join(code.co_names), ",".join(code.co_varnames),
             ",".join(code.co_freevars), str((code.co_argcount, code.co_kwonlyargcount, code.co_flags))]
    for const in consts:
        parts.append(_code_digest(const) if isinstance(const, types.CodeType) else repr(_sorted(const)))
    return _digest(parts)


def _stable(value: Any, context: Any = None) -> str:
    """A digest of a value that is the same in every process: its repr for plain data,
    else its pickle, else the source file of ``context`` (the module that defines it)."""
    if _plain(value):
        return _digest([repr(_sorted(value))])
    try:
        return hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()[:16]
    except Exception:
        pass
    shape = _shape(value)
    if shape is not None:  # containers of lambdas and other functions: by their code, not their file
        return _digest([shape])
    # anything else (a ufunc from np.frompyfunc, a lock, a connection): by its type and a repr that
    # names no address; how it was made is the module-level code the node's run records (trace)
    try:
        text = repr(value)
    except Exception:
        text = ""
    return _digest([f"{type(value).__module__}.{type(value).__qualname__}", "" if " at 0x" in text else text])


def _shape(value: Any, depth: int = 0) -> str | None:
    """A value made of plain data, containers and functions, written out with each function's
    code digest; None for anything else."""
    if depth > 10:
        return None
    if _plain(value):
        return repr(_sorted(value))
    if isinstance(value, types.FunctionType):
        return f"<fn {_code_digest(value.__code__)} {_shape(value.__defaults__, depth + 1)}>"
    if isinstance(value, functools.partial):
        return f"<partial {_shape((value.func, value.args, value.keywords), depth + 1)}>"
    if isinstance(value, list | tuple | set | frozenset):
        items = [_shape(v, depth + 1) for v in value]
        if any(i is None for i in items):
            return None
        return f"{type(value).__name__}[{','.join(sorted(items) if isinstance(value, set | frozenset) else items)}]"  # type: ignore[arg-type]
    if isinstance(value, dict):
        pairs = [(_shape(k, depth + 1), _shape(v, depth + 1)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        return "{" + ",".join(sorted(f"{k}:{v}" for k, v in pairs)) + "}"
    return None


def _plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, PLAIN):
        return True
    if depth > 10:
        return False
    if isinstance(value, list | tuple | set | frozenset):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return sorted((repr(k), _sorted(v)) for k, v in value.items())
    if isinstance(value, set | frozenset):
        return sorted(repr(v) for v in value)
    if isinstance(value, list | tuple):
        return type(value)(_sorted(v) for v in value)
    return value


def _file_digest(path: Path) -> str:
    try:
        if path.is_dir():
            path = path / "__init__.py"
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def environment(root: Path) -> dict[str, str]:
    """The distributions the project's modules import (as loaded now), with those they
    require: a library used only through the objects it returns (pandas, through a
    DataFrame) is still part of every result."""
    root = root.resolve()
    own = tuple(name for name in list(sys.modules) if _own(root, name))
    if own not in _ENVIRONMENTS:
        walk = _Walk(root)
        for name in own:
            walk.imports_of(name)
        _ENVIRONMENTS.clear()
        _ENVIRONMENTS[own] = walk.reach.dists
    return dict(_ENVIRONMENTS[own])


_ENVIRONMENTS: dict[tuple[str, ...], dict[str, str]] = {}
