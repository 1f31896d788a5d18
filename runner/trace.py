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
                out.append(f"code of {path}:{name} changed (it ran)" if name else
                           f"module-level code of {path} changed (the node ran code in it)")
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
        for unit in list(ran.code):  # the project modules those files import, for the constants they hand over
            if "::" not in unit:
                for imported in self.imports(unit):
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

    def imports(self, unit: str, seen: set[str] | None = None) -> list[str]:
        """The project files a file's module-level imports load (transitively)."""
        seen = set() if seen is None else seen
        out = []
        for module in _module_imports(_resolve(unit, self.root)):
            where = getattr(sys.modules.get(module), "__file__", None)
            if not where or not _traced(where) or not any(_under(where, s) for s in self.sources):
                continue
            name = self.name(where)
            if name not in seen:
                seen.add(name)
                out += [name, *self.imports(name, seen)]
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
    """A file's module-level unit and the units of the functions that ``lines`` fall in."""
    parsed = _parse(_resolve(name, root))
    out = {name: parsed.skeleton}
    for line in lines:
        function = parsed.function_at(line)
        if function is not None:
            out[f"{name}::{function}"] = parsed.functions[function]
    return out


def code_digest(unit: str, root: Path) -> str:
    path, _, function = unit.partition("::")
    parsed = _parse(_resolve(path, root))
    return parsed.functions.get(function, "absent") if function else parsed.skeleton


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
        self.spans: list[tuple[int, int, str]] = []  # (first body line, last line, qualname)
        if source is None:
            self.skeleton = "absent"
            return
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            self.skeleton = hashlib.sha256(source).hexdigest()[:16]
            return
        self._visit(tree.body, "")
        self.skeleton = _dump(_Skeleton().visit(tree))
        self.spans.sort(key=lambda span: (span[0], -span[1]))

    def _visit(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{node.name}"
                self.functions[name] = _dump(node)
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
    except OSError:
        parsed = _Parsed(None)
    _PARSED[str(path)] = (stamp, parsed)
    return parsed


_PARSED: dict[str, tuple[tuple[int, ...], _Parsed]] = {}


def _module_imports(path: Path) -> list[str]:
    """The modules a file's module-level statements import (absolute names)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    package = _package_of(path)
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - node.level + 1] if node.level > 1 else parts
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out.append(base)
            out += [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in out if name]


def _package_of(path: Path) -> str:
    """The dotted package a file belongs to, read from the loaded modules."""
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and Path(where).resolve() == path.resolve():
            return name if path.name == "__init__.py" else name.rpartition(".")[0]
    return ""


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
    """Source folders of the distributions installed editable (``pip install -e``)."""
    import importlib.metadata as metadata
    import json
    from urllib.parse import unquote, urlparse

    out = []
    for dist in metadata.distributions():
        text = dist.read_text("direct_url.json")
        if not text:
            continue
        try:
            info = json.loads(text)
        except ValueError:
            continue
        if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file://"):
            out.append(Path(unquote(urlparse(info["url"]).path)).resolve())
    return out
