"""The node cache: a node's outputs, keyed by everything they depend on, reused by every
job of a sweep and by later calls.

A node's key hashes its function's source (and the same-module functions it calls),
the values of the parameters it reads, the catalog entries of its inputs and outputs,
and, for each input, either the key of the node that produced it or the state of the
file it is read from. Change any of these and the key changes, for that node and
everything downstream; nothing else moves. A node tagged ``kmrun_nocache``, one reading
a dataset kmrun cannot fingerprint, and one whose outputs cannot be pickled are never
cached (nor is anything downstream of them).

Entries live as pickle files under the cache directory (written whole, then renamed)
and, once read or written, in this process's memory too, which forked workers inherit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import time
import types
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache as memoize
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kedro.pipeline import Pipeline

log = logging.getLogger(__name__)

NOCACHE_TAG = "kmrun_nocache"  # Kedro allows letters, digits, - _ . in tags


@dataclass
class Entry:
    """A cached node's outputs, and the run that computed them."""

    node: str
    outputs: dict[str, Any]
    run_id: str
    created: float


@dataclass
class Plan:
    """What one job takes from the cache, and what it runs."""

    keys: dict[str, str | None]  # node -> cache key (None: not cacheable)
    reasons: dict[str, str]  # node -> why it is not cached
    hits: dict[str, Entry] = field(default_factory=dict)  # nodes served from the cache
    run: list[str] = field(default_factory=list)  # nodes to run, in order
    inject: dict[str, Any] = field(default_factory=dict)  # dataset -> cached value, for nodes that run

    @property
    def sources(self) -> dict[str, str]:
        """Node -> the run that first computed its cached outputs."""
        return {node: entry.run_id for node, entry in self.hits.items()}


class NodeCache:
    """Content-addressed node outputs in a folder, with a size limit (least recently used
    entries go first)."""

    MEMORY_ENTRIES = 256  # entries kept in memory too, most recently used

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.memory: OrderedDict[str, Entry] = OrderedDict()
        self._written = 0  # bytes written since the folder's size was last checked

    def _remember(self, key: str, entry: Entry) -> None:
        self.memory[key] = entry
        self.memory.move_to_end(key)
        while len(self.memory) > self.MEMORY_ENTRIES:
            self.memory.popitem(last=False)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pkl"

    def get(self, key: str) -> Entry | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.path(key)
        try:
            entry = pickle.loads(path.read_bytes())
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged entry is a miss, and goes
            log.warning("Dropping the damaged cache entry %s: %s", path, err)
            path.unlink(missing_ok=True)
            return None
        self._remember(key, entry)
        return entry

    def put(self, key: str, node: str, outputs: dict[str, Any], run_id: str) -> str | None:
        """Store a node's outputs; returns why not, when they cannot be stored."""
        entry = Entry(node, dict(outputs), run_id, time.time())
        try:
            data = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            return f"its outputs cannot be pickled ({type(err).__name__}: {err})"
        path = self.path(key)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            temporary.replace(path)  # whole or not at all, whoever else writes the same key
        except OSError as err:
            temporary.unlink(missing_ok=True)
            return f"the cache folder cannot be written ({err.strerror})"
        self._remember(key, entry)
        self._written += len(data)
        if self._written > self.max_bytes / 20:  # look at the whole folder now and then, not at every write
            self._written = 0
            self.evict()
        return None

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*/*.pkl")) if self.root.is_dir() else []

    def _stats(self) -> list[tuple[Path, os.stat_result]]:
        """Each entry file and its stat (a file another process just removed is left out)."""
        out = []
        for path in self.files():
            try:
                out.append((path, path.stat()))
            except FileNotFoundError:
                continue
        return out

    def size(self) -> int:
        return sum(stat.st_size for _, stat in self._stats())

    def evict(self) -> None:
        stats = self._stats()
        total = sum(stat.st_size for _, stat in stats)
        if total <= self.max_bytes:
            return
        for path, stat in sorted(stats, key=lambda item: item[1].st_mtime):  # least recently used first
            if total <= self.max_bytes * 0.9:
                break
            total -= stat.st_size
            path.unlink(missing_ok=True)
            self.memory.pop(path.stem, None)

    def entries(self) -> list[tuple[Path, Entry]]:
        out = []
        for path in self.files():
            try:
                out.append((path, pickle.loads(path.read_bytes())))
            except Exception:  # shown as damaged by the caller's count
                continue
        return out

    def clear(self) -> int:
        files = self.files()
        for path in files:
            path.unlink(missing_ok=True)
        self.memory.clear()
        return len(files)


def plan(pipeline: Pipeline, params: Mapping[str, Any], catalog: Mapping[str, Any], root: Path,
         store: NodeCache) -> Plan:
    """Which nodes of ``pipeline`` the cache serves for a job with ``params``, which run,
    and the cached datasets the nodes that run need."""
    keys, reasons = node_keys(pipeline, params, catalog, root)
    result = Plan(keys, reasons)
    for node in pipeline.nodes:
        key = keys[node.name]
        entry = store.get(key) if key is not None else None
        if entry is not None:
            result.hits[node.name] = entry
        else:
            result.run.append(node.name)
    needed = {name for node in pipeline.nodes if node.name in result.run for name in node.inputs}
    for entry in result.hits.values():
        result.inject.update({name: value for name, value in entry.outputs.items() if name in needed})
    return result


def restrict(plan_: Plan, pipeline: Pipeline, nodes: list[str]) -> Plan:
    """The same plan, running only ``nodes`` (fed from the cache where it can)."""
    needed = {name for node in pipeline.nodes if node.name in nodes for name in node.inputs}
    inject = {name: value for entry in plan_.hits.values() for name, value in entry.outputs.items() if name in needed}
    return Plan(plan_.keys, plan_.reasons, dict(plan_.hits), list(nodes), inject)


def node_keys(pipeline: Pipeline, params: Mapping[str, Any], catalog: Mapping[str, Any],
              root: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """Each node's cache key, or None with the reason it has none."""
    from .fingerprint import _file_state

    producer = {out: node.name for node in pipeline.nodes for out in node.outputs}
    keys: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for node in pipeline.nodes:  # in dependency order
        reason = None
        parts = [node.name, ",".join(node.inputs), ",".join(node.outputs)]
        if NOCACHE_TAG in node.tags:
            reason = f"it is tagged {NOCACHE_TAG}"
        try:
            parts.append(code_hash(node.func))
        except (OSError, TypeError):
            reason = reason or "its function's source cannot be read"
        for name in node.inputs:
            if name == "parameters":
                parts.append(_json(params))
            elif name.startswith("params:"):
                parts.append(f"{name}={_json(_select(params, name[len('params:'):]))}")
            elif name in producer:
                upstream = keys[producer[name]]
                if upstream is None:
                    reason = reason or f"it reads {name}, made by {producer[name]}, which is not cached"
                parts.append(f"{name}<-{upstream}")
            else:
                entry = catalog.get(name)
                path = entry.get("filepath") if isinstance(entry, Mapping) else None
                if path is None or "://" in str(path):
                    reason = reason or f"it reads {name}, which is not a local file kmrun can fingerprint"
                    continue
                full = Path(str(path)) if Path(str(path)).is_absolute() else root / str(path)
                parts.append(f"{name}={_json(entry)}:{_file_state(full)}")
        parts += [f"{name}:{_json(catalog.get(name))}" for name in node.outputs]
        if reason is not None:
            keys[node.name], reasons[node.name] = None, reason
        else:
            keys[node.name] = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    return keys, reasons


@memoize
def code_hash(func: Any) -> str:
    """The source of a node's function and of the same-module functions it calls."""
    func = inspect.unwrap(getattr(func, "func", func))  # functools.partial, decorators
    seen: dict[str, str] = {}

    def visit(fn: Any) -> None:
        name = f"{fn.__module__}.{fn.__qualname__}"
        if name in seen:
            return
        seen[name] = inspect.getsource(fn)
        module = inspect.getmodule(fn)
        for called in _names(fn.__code__):
            target = getattr(module, called, None)
            if isinstance(target, types.FunctionType) and target.__module__ == fn.__module__:
                visit(target)

    visit(func)
    return hashlib.sha256("\n".join(seen[k] for k in sorted(seen)).encode()).hexdigest()[:16]


def _names(code: types.CodeType) -> Iterable[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _select(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def default_dir(uri: str) -> Path:
    """Beside an SQLite MLflow store (``kmrun-cache/``), else in the working directory."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "kmrun-cache"
    return Path.cwd() / ".kmrun-cache"
