"""What a node did when it ran, recorded on a miss and checked before its entry is used.

A static walk of a node's function (``deps``) cannot see what Python reaches at run time: a
class named in YAML, a module imported inside the node, a ``singledispatch`` branch, a
library decorator's wrapper. So while a node whose outputs will be stored runs, kmrun
records:

- **the project code it executed**, with coverage.py (only files under the project folder
  and the source folders of editable installs are traced): each executed function by the
  digest of its syntax tree, and each file it ran code in by the digest of its module-level
  statements (constants, imports, side effects; function bodies left out), together with
  those of the project modules that file imports;
- **the files it opened for reading** and the folders it listed, by content, through
  Python's audit hook (``open``, ``os.listdir``, ``os.scandir``);
- **the environment variables it read** through ``os.environ`` (``os.getenv`` too), by a
  salted digest of their values, so that no value is stored.

The record (``Ran``) is kept with the entry, and the entry is used only while every unit
still has its digest (``Ran.changes``). Comments, blank lines, line endings and edits of
functions the node did not run change no digest.

Out of reach, and documented: code in C extensions (the project's own compiled modules
included), files opened by C code without Python's ``open``, code run in other processes
the node starts, a whole environment copied (``dict(os.environ)``, ``subprocess``: those
reads are not recorded) and randomness from the clock.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# variables that kmrun, MLflow, Ray or the terminal set per command or per job: never part of a result
VOLATILE_ENV = ("KMRUN_", "MLFLOW_", "RAY_", "CUDA_VISIBLE_DEVICES", "PWD", "OLDPWD", "SHLVL", "_", "TERM",
                "COLORTERM", "COLUMNS", "LINES", "SSH_", "DISPLAY", "XDG_", "TMUX", "PS1", "LS_COLORS",
                "PYTEST_", "COV_CORE_", "COVERAGE_", "NO_COLOR", "FORCE_COLOR", "OLDPWD", "HYDRA_")
CODE_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".pyd", ".pth")
SYSTEM_DIRS = ("/proc/", "/sys/", "/dev/", "/etc/", "/usr/share/zoneinfo/",
               *sorted({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}))


@dataclass
class Ran:
    """What one node run executed and read: ``code`` (``FILE`` for a file's module-level
    statements, ``FILE::QUALNAME`` for a function), ``files`` (a path, or ``PATH/`` for a
    folder's listing) and ``env`` (a variable's name), each with its digest."""

    code: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def changes(self, root: Path, salt: bytes, first: bool = False) -> list[str]:
        """What no longer holds, in words ("code of src/pkg/x.py:f changed (it ran)"); empty
        when every unit still has its digest. ``first``: stop at the first change."""
        out: list[str] = []
        for unit, digest in self.code.items():
            if code_digest(unit, root) != digest:
                path, _, name = unit.partition("::")
                out.append(f"code of {path}:{name} changed (it ran)" if name and not name.startswith("<module") else
                           f"module-level code of {path} changed (the node ran code in it, or imports it)")
                if first:
                    return out
        for path, digest in self.files.items():
            if file_digest(path, root) != digest:
                out.append(f"{'folder' if path.endswith('/') else 'file'} {path} changed (the node read it)")
                if first:
                    return out
        for name, digest in self.env.items():
            if env_digest(name, salt) != digest:
                out.append(f"env var {name} changed (the node read it)")
                if first:
                    return out
        return out


class Recorder:
    """Records one node run at a time in this process (``start`` → ``stop``)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.sources = [self.root, *editable_sources()]
        self.ignore: list[str] = []
        self._coverage: Any = None
        self._pid = 0
        self._contexts = 0
        self._opened: set[str] = set()
        self._listed: set[str] = set()
        self._env: set[str] = set()
        self.io = False  # files and variables are recorded from the node's call on (its inputs are keyed)

    def start(self, ignore: Iterable[Path | None] = ()) -> None:
        """Record from now on; files under ``ignore`` (kmrun's own folders) are not recorded."""
        global _ACTIVE
        self.ignore = [str(p.resolve()) + os.sep for p in ignore if p is not None]
        if self._coverage is None or self._pid != os.getpid():  # a forked worker starts its own
            import coverage

            self._coverage = coverage.Coverage(data_file=None, source=[str(s) for s in self.sources],
                                               config_file=False)
            self._coverage.set_option("run:omit", [f"{_KMRUN}{os.sep}*", "*/site-packages/*", "*/dist-packages/*"])
            self._coverage.set_option("run:disable_warnings", ["no-data-collected", "module-not-measured",
                                                               "module-not-imported", "couldnt-parse"])
            self._pid, self._contexts = os.getpid(), 0
        self._opened, self._listed, self._env = set(), set(), set()
        self.io = False
        self._contexts += 1
        self._coverage.start()
        self._coverage.switch_context(f"n{self._contexts}")
        _ACTIVE = self

    def stop(self, salt: bytes) -> Ran:
        """End the recording and return what the node did."""
        global _ACTIVE
        _ACTIVE = None
        self._coverage.stop()
        data = self._coverage.get_data()
        data.set_query_contexts([f"n{self._contexts}"])
        ran = Ran()
        for measured in sorted(data.measured_files()):
            lines = data.lines(measured)
            if not lines or not _traced(measured):
                continue
            name = self.name(measured)
            ran.code.update(units(name, self.root, lines))
        seen: set[str] = set()
        for unit in list(ran.code):  # the project modules those files import: their side effects, and
            path, _, function = unit.partition("::")  # the values of the names taken from them
            if not function or function.startswith("<module"):
                for imported in self.imports(path, _names_of(function), seen):
                    ran.code.setdefault(imported, code_digest(imported, self.root))
        for path in sorted(self._opened):
            name = self.name(path)
            ran.files[name] = file_digest(name, self.root)
        for path in sorted(self._listed):
            name = self.name(path).rstrip("/") + "/"
            ran.files[name] = file_digest(name, self.root)
        ran.env = {name: env_digest(name, salt) for name in sorted(self._env)}
        if self._contexts >= 500:  # coverage keeps every context's lines: start afresh now and then
            self._coverage.erase()
            self._coverage = None
        return ran

    def abandon(self) -> None:
        global _ACTIVE
        _ACTIVE = None
        if self._coverage is not None:
            self._coverage.stop()

    def name(self, path: str) -> str:
        """A path as stored: relative to the project folder when under it."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(Path(path).resolve())

    def imports(self, name: str, names: frozenset[str] | None, seen: set[str]) -> list[str]:
        """The units of the project files that file ``name``'s imports load, transitively, as
        far as ``names`` (in ``name``) need them: ``from m import A`` with ``A`` needed takes
        what ``A`` needs in ``m``; ``import m as x`` with ``x`` needed takes all of ``m``; any
        other import takes the imported module's side effects (its statements that are not
        definitions)."""
        out = []
        for module, wanted in _parse(_resolve(name, self.root)).imports(names):
            where = getattr(sys.modules.get(module), "__file__", None)
            if not where or not _traced(where) or not any(_under(where, s) for s in self.sources):
                continue
            imported = self.name(where)
            unit = imported if wanted is None else f"{imported}::<module {','.join(sorted(wanted))}>"
            if unit not in seen:
                seen.add(unit)
                out += [unit, *self.imports(imported, wanted, seen)]
        return out

    def opened(self, path: Any, writing: bool) -> None:
        if not self.io or writing or not isinstance(path, str | bytes | os.PathLike):
            return
        text = os.fsdecode(path)
        if text.endswith(CODE_SUFFIXES) or "__pycache__" in text:
            return  # code is recorded by what ran
        full = os.path.abspath(text)
        full = os.path.realpath(full)
        if full.startswith(SYSTEM_DIRS) or not _traced(full) or any(full.startswith(i) for i in self.ignore):
            return
        if os.path.isfile(full):
            self._opened.add(full)

    def listed(self, path: Any) -> None:
        if not self.io or not isinstance(path, str | bytes | os.PathLike):
            return
        full = os.path.realpath(os.fsdecode(path) or ".")
        if full.startswith(SYSTEM_DIRS) or not _traced(full + os.sep) or any(
                (full + os.sep).startswith(i) for i in self.ignore):
            return
        self._listed.add(full)

    def read_env(self, name: Any) -> None:
        if self.io and isinstance(name, str) and not (name in VOLATILE_ENV or name.startswith(VOLATILE_ENV)):
            self._env.add(name)


_ACTIVE: Recorder | None = None
_HOOKED = False
_LOCK = threading.Lock()


def install() -> None:
    """The audit hook and the environment's reader, once per process (hooks cannot be removed:
    both do nothing while no node is being recorded)."""
    global _HOOKED
    with _LOCK:
        if _HOOKED:
            return
        sys.addaudithook(_audit)
        if type(os.environ) is os._Environ:  # not replaced by someone else
            os.environ.__class__ = _RecordedEnviron
        _HOOKED = True


def _audit(event: str, args: tuple[Any, ...]) -> None:
    recorder = _ACTIVE
    if recorder is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
            (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        recorder.opened(path, writing)
    elif event in ("os.listdir", "os.scandir"):
        recorder.listed(args[0] if args else ".")


class _RecordedEnviron(os._Environ):  # type: ignore[name-defined,misc]
    """``os.environ``, noting the names read while a node is recorded."""

    def __getitem__(self, key: str) -> str:
        recorder = _ACTIVE
        if recorder is not None:
            recorder.read_env(key)
        return super().__getitem__(key)


def env_digest(name: str, salt: bytes) -> str:
    """A variable's value, salted and hashed: nothing secret is stored."""
    value = os.environ.get(name)
    return "absent" if value is None else hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:16]


def units(name: str, root: Path, lines: Iterable[int]) -> dict[str, str]:
    """The units of the functions that ``lines`` fall in, and the file's module-level unit:
    its statements other than assignments, and the assignments of the names those functions
    read (and of the names those assignments read, and so on). Module-level lines outside
    any function (the file imported during the node) take every statement."""
    parsed = _parse(_resolve(name, root))
    out = {}
    reads: set[str] | None = set()
    for line in lines:
        function = parsed.function_at(line)
        if function is None:
            reads = None
        else:
            out[f"{name}::{function}"] = parsed.functions[function]
            if reads is not None:
                reads |= parsed.reads[function] | {function.split(".")[0]}  # a method needs its class
    module = name if reads is None else f"{name}::<module {','.join(sorted(reads))}>"
    out[module] = code_digest(module, root)
    return out


def code_digest(unit: str, root: Path) -> str:
    path, _, function = unit.partition("::")
    parsed = _parse(_resolve(path, root))
    if not function:
        return parsed.module(None)
    if function.startswith("<module"):
        return parsed.module(_names_of(function))
    return parsed.functions.get(function, "absent")


def _names_of(function: str) -> frozenset[str] | None:
    """The names a module unit (``<module A,B>``) stands for; None for the whole module."""
    if not function.startswith("<module"):
        return None
    return frozenset(n for n in function[len("<module "):-1].split(",") if n)


def file_digest(name: str, root: Path) -> str:
    """A file's content (or, for ``PATH/``, a folder's sorted listing)."""
    path = _resolve(name.rstrip("/"), root)
    try:
        if name.endswith("/"):
            return hashlib.sha256("\n".join(sorted(os.listdir(path))).encode()).hexdigest()[:16]
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = _FILES.get(str(path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILES[str(path)] = (stamp, digest.hexdigest()[:16])
        return _FILES[str(path)][1]
    except OSError:
        return "absent"


_FILES: dict[str, tuple[tuple[int, int, int], str]] = {}


class _Parsed:
    """A Python file's units: its module-level statements (function bodies left out) and
    each function (by qualified name), each by the digest of its syntax tree."""

    def __init__(self, source: bytes | None) -> None:
        self.functions: dict[str, str] = {}
        self.reads: dict[str, set[str]] = {}  # function -> the names it reads
        self.spans: list[tuple[int, int, str]] = []  # (first body line, last line, qualname)
        self.statements: list[tuple[set[str] | None, set[str], str]] = []  # (names bound or None, read, digest)
        self._imports: list[tuple[str, set[str], str | None]] = []  # (module, names it binds here, name taken)
        self._modules: dict[frozenset[str] | None, tuple[str, frozenset[str]]] = {}
        self._path: Path | None = None
        if source is None:
            self._modules[None] = ("absent", frozenset())
            return
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            self._modules[None] = (hashlib.sha256(source).hexdigest()[:16], frozenset())
            return
        self._visit(tree.body, "")
        self.spans.sort(key=lambda span: (span[0], -span[1]))
        self.tree = tree
        for statement in _Skeleton().visit(_undocumented(tree)).body:
            bound = _bound(statement)
            self.statements.append((bound, _read(statement), _dump(statement)))

    def module(self, names: frozenset[str] | None) -> str:
        """The digest of the module-level statements that ``names`` need (every one for None)."""
        return self._closure(names)[0]

    def _closure(self, names: frozenset[str] | None) -> tuple[str, frozenset[str]]:
        """What ``names`` need at module level: every statement that binds no name (a side effect),
        and the statements that bind a needed name (an assignment, a ``def``, a ``class``, an
        import), followed through the names they read. Returns the digest of those statements
        and every name needed."""
        if names not in self._modules:
            kept = [names is None or bound is None for bound, _, _ in self.statements]
            needed = set(names or ()) | {n for keep, (_, read, _) in zip(kept, self.statements, strict=True) if keep
                                         for n in read}
            grew = True
            while grew:
                grew = False
                for i, (bound, read, _) in enumerate(self.statements):
                    if not kept[i] and bound is not None and bound & needed:
                        kept[i], grew = True, True
                        needed |= read
            if names is None:
                needed |= {n for bound, _, _ in self.statements if bound for n in bound}
            digest = _digest_of(d for keep, (_, _, d) in zip(kept, self.statements, strict=True) if keep)
            self._modules[names] = (digest, frozenset(needed))
        return self._modules[names]

    def imports(self, names: frozenset[str] | None) -> list[tuple[str, frozenset[str] | None]]:
        """The modules this file imports at module level, each with what ``names`` need of it
        (None: all of it; empty: its side effects only)."""
        if self._path is None or not hasattr(self, "tree"):
            return []
        needed = self._closure(names)[1]
        package = _package_of(self._path)
        out: list[tuple[str, frozenset[str] | None]] = []
        for node in self.tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    binds = alias.asname or alias.name.split(".")[0]
                    out.append((alias.name, None if binds in needed else frozenset()))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".") if package else []
                    parts = parts[:len(parts) - node.level + 1] if node.level > 1 else parts
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                if any(alias.name == "*" for alias in node.names):
                    out.append((base, None))
                    continue
                taken = frozenset(a.name for a in node.names if (a.asname or a.name) in needed)
                out.append((base, taken))
                for alias in node.names:  # a submodule taken by name
                    if f"{base}.{alias.name}" in sys.modules:
                        out.append((f"{base}.{alias.name}", None if (alias.asname or alias.name) in needed
                                    else frozenset()))
        parents: list[tuple[str, frozenset[str] | None]] = [
            (".".join(m.split(".")[:i]), frozenset()) for m, _ in out for i in range(1, m.count(".") + 1)]
        return [(module, wanted) for module, wanted in [*out, *parents] if module]  # a package's __init__ runs too

    def _visit(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{node.name}"
                self.functions[name] = _dump(_undocumented(node))
                self.reads[name] = _read(node)
                self.spans.append((node.body[0].lineno, node.end_lineno or node.lineno, name))
                self._visit(node.body, f"{name}.<locals>.")
            elif isinstance(node, ast.ClassDef):
                self._visit(node.body, f"{prefix}{node.name}.")
            else:
                for child in ast.iter_child_nodes(node):  # functions under if/try/with at any level
                    if isinstance(child, ast.stmt):
                        self._visit([child], prefix)

    def function_at(self, line: int) -> str | None:
        """The innermost function whose body holds ``line``."""
        found = None
        for first, last, name in self.spans:
            if first > line:
                break
            if line <= last:
                found = name  # later spans that hold the line are nested deeper
        return found


class _Skeleton(ast.NodeTransformer):
    """Module-level statements only: a function keeps its signature, decorators and
    defaults (evaluated when the module runs), not its body."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        node.body = [ast.Pass()]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> Any:
        node.body = [ast.Pass()]
        return node


def _dump(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node, annotate_fields=False).encode()).hexdigest()[:16]


def _digest_of(parts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _bound(statement: ast.stmt) -> set[str] | None:
    """The names a module-level statement binds: an assignment to names, a ``def``, a
    ``class``, an import. None for any other statement (a call, ``obj.attr = ...``, an ``if``):
    a side effect, which every unit of the module keeps."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {statement.name}
    if isinstance(statement, ast.Import | ast.ImportFrom):
        if any(alias.name == "*" for alias in statement.names):
            return None
        return {alias.asname or alias.name.split(".")[0] for alias in statement.names}
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign | ast.AugAssign):
        targets = [statement.target]
    else:
        return None
    if any(not isinstance(t, ast.Name | ast.Tuple | ast.List | ast.Starred) for t in targets):
        return None  # d[k] = ... or obj.attr = ...: a side effect on something else
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _read(node: ast.AST) -> set[str]:
    """Every name a piece of code reads (globals among them)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}


def _undocumented(node: Any) -> Any:
    """The same tree without docstrings (of the module, classes and functions), which change
    no behaviour; the tree is copied first."""
    import copy

    node = copy.deepcopy(node)
    for item in ast.walk(node):
        body = getattr(item, "body", None)
        if isinstance(item, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            item.body = body[1:] or [ast.Pass()]
    return node


def _parse(path: Path) -> _Parsed:
    try:
        st = os.stat(path)
        stamp: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return _Parsed(None)
    hit = _PARSED.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        parsed = _Parsed(path.read_bytes())
        parsed._path = path
    except OSError:
        parsed = _Parsed(None)
    _PARSED[str(path)] = (stamp, parsed)
    return parsed


_PARSED: dict[str, tuple[tuple[int, ...], _Parsed]] = {}


def _package_of(path: Path) -> str:
    """The dotted package a file belongs to, read from the ``sys.path`` entry it lies under."""
    real = os.path.realpath(path)
    entries = _ENTRIES.get(tuple(sys.path))
    if entries is None:
        entries = sorted({os.path.realpath(p or ".") for p in sys.path}, key=len, reverse=True)
        _ENTRIES.clear()
        _ENTRIES[tuple(sys.path)] = entries
    for entry in entries:
        if real.startswith(entry + os.sep):
            parts = list(Path(real[len(entry) + 1:]).with_suffix("").parts)
            return ".".join(parts[:-1])  # a package's __init__ and a module alike: the folder's package
    return ""


_ENTRIES: dict[tuple[str, ...], list[str]] = {}


def _resolve(name: str, root: Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


_KMRUN = str(Path(__file__).resolve().parent)  # kmrun's own hooks run inside the window: not the node's code


@functools.lru_cache(maxsize=4096)
def _traced(path: str) -> bool:
    """Not an installed library's file, nor one inside a virtual environment."""
    parts = Path(path).parts
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not any(os.path.exists(os.path.join(*parts[:i], "pyvenv.cfg")) for i in range(2, len(parts)))


def _under(path: str, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def editable_sources() -> list[Path]:
    """Source folders of the distributions installed editable (``pip install -e``): read from
    the ``direct_url.json`` files in the environment's site folders (far cheaper than asking
    ``importlib.metadata`` about every distribution)."""
    import json
    import site
    from urllib.parse import unquote, urlparse

    folders = {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    folders.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    out = []
    for folder in sorted(folders):
        for found in sorted(Path(folder).glob("*.dist-info/direct_url.json")):
            try:
                info = json.loads(found.read_text())
            except (OSError, ValueError):
                continue
            if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file://"):
                out.append(Path(unquote(urlparse(info["url"]).path)).resolve())
    return out
