"""The node cache: a node's outputs, keyed by everything they depend on, reused by every
job of a sweep and by later calls.

A node's key hashes the project code its function reaches (``deps``: followed across
modules, classes, constants and sibling packages) and the versions of the installed
distributions that code uses, the Python version, the project's hooks, the classes of its
datasets (a library that makes a DataFrame is keyed where the DataFrame enters: at
its dataset, or at the node that built it), the values of the parameters it reads, the catalog entries of its inputs and
outputs as resolved for the job (runtime params, dataset factories), and, for each input,
either the key of the node that produced it or the state of the file or folder it is read
from. Change any of these and the key changes, for that node and everything downstream;
nothing else moves. Each entry leaves the named parts of its key beside it, so that the
next miss of that node can say what changed. A node tagged ``kmrun_nocache``, one reading
a dataset kmrun cannot fingerprint, and one whose outputs cannot be pickled are never
cached (nor is anything downstream of them).

Entries live as pickle files under the cache directory (written whole, then renamed)
and, once read or written, in this process's memory too, which forked workers inherit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kedro.pipeline import Pipeline

    from .datasets import Catalog
    from .trace import Ran

log = logging.getLogger(__name__)

NOCACHE_TAG = "kmrun_nocache"  # Kedro allows letters, digits, - _ . in tags


@dataclass
class Entry:
    """A cached node's outputs, and the run that computed them."""

    node: str
    outputs: dict[str, Any]
    run_id: str
    created: float
    ran: Ran | None = None  # what the node executed and read when it computed them; None: unknown, never used
    inputs: dict[str, str] | None = None  # input made by another node -> the token of the entry it was read from


@dataclass
class Plan:
    """What one job takes from the cache, and what it runs."""

    keys: dict[str, str | None]  # node -> cache key (None: not cacheable)
    reasons: dict[str, str]  # node -> why it is not cached
    parts: dict[str, dict[str, str]]  # node -> the named parts its key hashes
    hits: dict[str, Entry] = field(default_factory=dict)  # nodes served from the cache
    run: list[str] = field(default_factory=list)  # nodes to run, in order
    inject: dict[str, Any] = field(default_factory=dict)  # dataset -> cached value, for nodes that run
    why: dict[str, str] = field(default_factory=dict)  # node that runs -> what changed since its last entry
    tokens: dict[str, str] = field(default_factory=dict)  # dataset -> the token of the entry it comes from
    serve: bool = True  # False (cache=false): nothing is served, every node runs and refreshes its entry

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
        self._salt_value: bytes | None = None
        self._written = 0  # bytes written since the folder's size was last checked
        self._explained: dict[str, tuple[str, Any]] = {}  # node -> the summary this process wrote, its file's stamp

    def _remember(self, key: str, entry: Entry) -> None:
        self.memory[key] = entry
        self.memory.move_to_end(key)
        while len(self.memory) > self.MEMORY_ENTRIES:
            self.memory.popitem(last=False)

    def path(self, key: str) -> Path:
        """An entry's file, named by the key salted with this cache's own secret: a file name
        cannot be checked against a guessed parameter value."""
        name = hmac.new(self._salt(), key.encode(), hashlib.sha256).hexdigest()[:32]
        return self.root / name[:2] / f"{name}.pkl"

    def salt(self) -> bytes:
        """This cache's own secret (environment variables are kept by digests salted with it)."""
        return self._salt()

    def _salt(self) -> bytes:
        if self._salt_value is None:
            where = self.root / "salt"
            try:
                self._salt_value = where.read_bytes()
            except FileNotFoundError:
                self.root.mkdir(parents=True, exist_ok=True)
                fresh = where.with_suffix(f".{os.getpid()}.tmp")
                fresh.write_bytes(secrets.token_bytes(32))
                fresh.chmod(0o600)
                try:
                    os.link(fresh, where)  # the first process to make it wins; the others read it
                except FileExistsError:
                    pass
                fresh.unlink(missing_ok=True)
                self._salt_value = where.read_bytes()
        return self._salt_value

    def get(self, key: str) -> Entry | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.path(key)
        try:
            entry = pickle.loads(path.read_bytes())
            if not isinstance(entry, Entry) or not isinstance(entry.outputs, dict):
                raise TypeError(f"it holds a {type(entry).__name__}, not a cache entry")
            os.utime(path)  # recently used
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged entry is a miss, and goes
            log.warning("Dropping the damaged cache entry %s: %s", path, err)
            path.unlink(missing_ok=True)
            return None
        self._remember(key, entry)
        return entry

    def why(self, node: str, parts: Mapping[str, str]) -> str:
        """What differs between ``parts`` and the parts of the node's last entry for the same
        inputs, in words ("code of pkg.helpers.make_model"); with no entry for these inputs,
        what differs from the node's last entry ("new inputs: param split.seed: 42 -> 1")."""
        now = _summary(parts)
        for slot, prefix in ((_given(parts), ""), (None, "new inputs: ")):
            try:
                last = json.loads(self._last(node, slot).read_text())
            except (OSError, ValueError):
                continue
            return prefix + (differences(last, now) or "its entry was evicted or cleared")
        return "no earlier entry of this node"

    def _last(self, node: str, given: str | None = None) -> Path:
        """The parts of the node's last entry (for the inputs digested as ``given``)."""
        name = node if given is None else f"{node}\0{given}"
        return self.root / "nodes" / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.json"

    def put(self, key: str, node: str, outputs: dict[str, Any], run_id: str,
            parts: Mapping[str, str] | None = None, ran: Ran | None = None,
            inputs: Mapping[str, str] | None = None) -> str | None:
        """Store a node's outputs with what it ran and read (``ran``), the tokens of the entries
        its inputs came from (``inputs``), and the parts of their key (to explain the next
        miss); returns why not, when they cannot be stored."""
        if ran is None:
            return "what it ran was not recorded"
        entry = Entry(node, dict(outputs), run_id, time.time(), ran, dict(inputs or {}))
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
        if parts is not None:
            summary = json.dumps(_summary(parts), sort_keys=True)
            self._explain(node, None, summary)
            self._explain(node, _given(parts), summary)
        self._remember(key, entry)
        self._written += len(data)
        if self._written > self.max_bytes / 20:  # look at the whole folder now and then, not at every write
            self._written = 0
            self.evict()
        return None

    def _explain(self, node: str, given: str | None, summary: str) -> None:
        """Keep ``summary`` as the parts of ``node``'s last entry (for the inputs ``given``), unless
        the file holds it already (written by this process, and not since by another)."""
        last = self._last(node, given)
        slot = f"{node}\0{given}"
        try:
            if self._explained.get(slot) == (summary, _stamp(last)):
                return
        except OSError:
            pass
        try:
            last.parent.mkdir(parents=True, exist_ok=True)
            temporary = last.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(summary)
            temporary.replace(last)
            self._explained[slot] = (summary, _stamp(last))
        except OSError:  # only an explanation is lost
            self._explained.pop(slot, None)

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
            for key in [k for k in self.memory if self.path(k) == path]:
                del self.memory[key]

    def entries(self) -> list[tuple[Path, Entry]]:
        out = []
        for path in self.files():
            try:
                entry = pickle.loads(path.read_bytes())
            except Exception:  # shown as damaged by the caller's count
                continue
            if isinstance(entry, Entry):
                out.append((path, entry))
        return out

    def clear(self) -> int:
        files = self.files()
        for path in [*files, *(self.root / "nodes").glob("*.json")]:
            path.unlink(missing_ok=True)
        self.memory.clear()
        return len(files)


def plan(pipeline: Pipeline, params: Mapping[str, Any], catalog: Catalog, root: Path, store: NodeCache,
         serve: bool = True, allow_secrets: bool = False) -> Plan:
    """Which nodes of ``pipeline`` the cache serves for a job with ``params``, which run,
    and the cached datasets the nodes that run need. With ``serve=False`` (``cache=false``)
    every node runs, and what they compute refreshes the cache. A node that reads a
    secret-named parameter is not cached unless ``allow_secrets``."""
    keys, reasons, parts = node_keys(pipeline, params, catalog, root, allow_secrets)
    result = Plan(keys, reasons, parts, serve=serve)
    recomputed: dict[str, str] = {}  # dataset -> the node that computes it in this job
    for node in pipeline.nodes:
        key = keys[node.name]
        entry = store.get(key) if key is not None and serve else None
        why = None
        if entry is not None:
            why = _stale(node, entry, result.tokens, recomputed, root, store)
        if entry is not None and key is not None and why is None:
            result.hits[node.name] = entry
            result.tokens.update({name: token(key, entry.ran) for name in node.outputs})
            continue
        result.run.append(node.name)
        recomputed.update({name: node.name for name in node.outputs})
        if key is not None and serve:
            result.why[node.name] = why or store.why(node.name, parts[node.name])
    needed = {name for node in pipeline.nodes if node.name in result.run for name in node.inputs}
    for entry in result.hits.values():
        result.inject.update({name: value for name, value in entry.outputs.items() if name in needed})
    return result


def _stale(node: Any, entry: Entry, tokens: Mapping[str, str], recomputed: Mapping[str, str], root: Path,
           store: NodeCache) -> str | None:
    """Why an entry found under the node's key may not be used, or None. The key holds what
    the node is given; the entry must also have been computed from the very entries its
    inputs come from now (a producer whose code changed at run time keeps its key), and
    everything it ran and read must be unchanged."""
    for name in node.inputs:
        if name in recomputed:
            return f"its input {name} is computed again by {recomputed[name]}"
        if name in tokens and (entry.inputs or {}).get(name) != tokens[name]:
            return f"its input {name} is not the one its entry was computed from"
    if entry.ran is None:
        return "its entry does not say what the node ran (stored by an earlier kmrun)"
    return next(iter(entry.ran.changes(root.resolve(), store.salt(), first=True)), None)


def token(key: str, ran: Ran | None) -> str:
    """An entry's identity for the entries computed from it: its key and what it ran (the same
    code on the same inputs computes the same outputs)."""
    record = [ran.code, ran.files, ran.env] if ran is not None else None
    return hashlib.sha256(json.dumps([key, record], sort_keys=True).encode()).hexdigest()[:16]


def restrict(plan_: Plan, pipeline: Pipeline, nodes: list[str]) -> Plan:
    """The same plan, running only ``nodes`` (fed from the cache where it can)."""
    needed = {name for node in pipeline.nodes if node.name in nodes for name in node.inputs}
    inject = {name: value for entry in plan_.hits.values() for name, value in entry.outputs.items() if name in needed}
    return Plan(plan_.keys, plan_.reasons, plan_.parts, dict(plan_.hits), list(nodes), inject,
                tokens=dict(plan_.tokens))


def node_keys(pipeline: Pipeline, params: Mapping[str, Any], catalog: Catalog, root: Path,
              allow_secrets: bool = False) -> tuple[dict[str, str | None], dict[str, str], dict[str, dict[str, str]]]:
    """Each node's cache key (or None, with the reason it has none), and the named parts
    the key hashes (``code MODULE.NAME``, ``param X``, ``input X``, ``dist NAME``, ...)."""
    from . import deps

    root = root.resolve()
    producer = {out: node.name for node in pipeline.nodes for out in node.outputs}
    shared = _shared_parts(pipeline, catalog, root)
    keys: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    all_parts: dict[str, dict[str, str]] = {}
    for node in pipeline.nodes:  # in dependency order
        reason = None
        parts = {"node": f"{node.name}|{','.join(node.inputs)}|{','.join(node.outputs)}", **shared}
        if NOCACHE_TAG in node.tags:
            reason = f"it is tagged {NOCACHE_TAG}"
        reach = deps.reach(node.func, root)
        parts.update(reach.parts(root))
        if reach.coarse:
            parts["coarse"] = reach.coarse  # shown by kmrun cache explain: keyed by the whole project's code
        for name in node.inputs:
            if name == "parameters" or name.startswith("params:"):
                prefix = name[len("params:"):] if name != "parameters" else ""
                value = _select(params, prefix) if prefix else params
                parts[f"param {prefix or '(all)'}"] = _json(value)
                secret = _secret(value, prefix)
                if secret and not allow_secrets:
                    reason = reason or (f"it reads the secret-named parameter {secret}, which its outputs may hold "
                                        "(cache.secrets=true caches it anyway)")
            elif name in producer:
                upstream = keys[producer[name]]
                if upstream is None:
                    reason = reason or f"it reads {name}, made by {producer[name]}, which is not cached"
                parts[f"input {name}"] = f"from {producer[name]}: {upstream}"
            else:
                state = catalog.state(name)
                if state is None:
                    reason = reason or f"it reads {name}, which is not a local file kmrun can fingerprint"
                    continue
                parts[f"input {name}"] = state
                parts[f"entry {name}"] = _json(catalog.entry(name))
                parts.update(_named(_dataset_reach(catalog.entry(name), root)))
        for name in node.outputs:
            parts[f"output {name}"] = _json(catalog.entry(name))
            parts.update(_named(_dataset_reach(catalog.entry(name), root)))
        all_parts[node.name] = parts
        if reason is not None:
            keys[node.name], reasons[node.name] = None, reason
        else:
            keys[node.name] = hashlib.sha256(_json(parts).encode()).hexdigest()[:32]
    return keys, reasons, all_parts


def _shared_parts(pipeline: Pipeline, catalog: Catalog, root: Path) -> dict[str, str]:
    """What every node's result may depend on: the project's hooks (they see every node's
    data), their code and the distributions they use."""
    from kedro.framework.project import settings

    from . import deps

    reach = deps.Reach()
    for hook in settings.HOOKS:  # kmrun's own hook goes to its session, not to the settings
        reach.merge(deps.reach(hook, root))
    return _named(reach)


def _named(reach: Any) -> dict[str, str]:
    return {**{f"code {name}": digest for name, digest in reach.code.items()},
            **{f"dist {name}": version for name, version in reach.dists.items()}}


def _dataset_reach(entry: Mapping[str, Any] | None, root: Path) -> Any:
    """What a dataset's class reaches (a custom dataset of the project's own is code)."""
    from . import deps

    if not entry or "type" not in entry:
        return deps.Reach()
    kind = entry["type"] if isinstance(entry["type"], str) else repr(entry["type"])
    if kind not in _DATASET_CLASSES:
        from kedro.io.core import parse_dataset_definition

        try:
            _DATASET_CLASSES[kind] = parse_dataset_definition({"type": entry["type"]})[0]
        except Exception:
            _DATASET_CLASSES[kind] = None
    cls = _DATASET_CLASSES[kind]
    if cls is None:
        return deps.Reach(code={f"dataset type {kind}": "unloadable"})
    return deps.reach(cls, root)


_DATASET_CLASSES: dict[str, Any] = {}


def _stamp(path: Path) -> tuple[int, int, int]:
    """A file as written: another writer's replace gives another inode."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _summary(parts: Mapping[str, str]) -> dict[str, str]:
    """A key's parts as kept beside an entry: versions, producers and parameter values (short
    ones; a node that reads a secret-named parameter is not cached) as they are, every other
    value by digest only."""
    return {name: value if name.startswith(("dist ", "python")) or value.startswith("from ")
            or (name.startswith("param ") and len(value) <= 2000 and not _secret_part(name, value))
            else hashlib.sha256(value.encode()).hexdigest()[:16] for name, value in parts.items()}


def _secret_part(name: str, value: str) -> bool:
    section = name[len("param "):]
    try:
        return _secret(json.loads(value), "" if section == "(all)" else section) is not None
    except ValueError:
        return True


def _given(parts: Mapping[str, str]) -> str:
    """A digest of what a node is given: its parameters and inputs (not its code)."""
    given = sorted((name, value) for name, value in parts.items() if name.startswith(("param ", "input ")))
    return hashlib.sha256(json.dumps(given).encode()).hexdigest()[:16]


def differences(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """The parts of a key that changed, in words, most telling first."""
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    words = []
    for name in changed:
        kind, _, what = name.partition(" ")
        if kind == "code":
            words.append(f"code of {what}" if name in before and name in after else
                         f"code of {what} ({'now used' if name in after else 'no longer used'})")
        elif kind == "dist":
            old, new = before.get(name, "absent").split()[0], after.get(name, "absent").split()[0]
            words.append(f"environment: {what} {old} -> {new}" if old != new else
                         f"environment: {what} {new} (its installed files or its source changed)")
        elif kind == "input" and str(after.get(name, "")).startswith("from "):
            words.append(f"input {what} (its producer {after[name].split(':')[0][5:]} changed)")
        elif kind == "param" and name in before and name in after:
            words.append(_param_change(what, before[name], after[name]))
        elif kind in ("param", "input", "output", "entry"):
            words.append({"output": "catalog entry of output", "entry": "catalog entry of input"}.get(kind, kind)
                         + f" {what}")
        elif name == "python":
            words.append("environment: the Python version")
        else:
            words.append(name)
    return "; ".join(words)


def _param_change(section: str, before: str, after: str) -> str:
    """``param split.seed: 42 -> 1`` for each leaf that changed (a digest says only which section)."""
    from .redact import flatten

    try:
        old, new = json.loads(before), json.loads(after)
    except ValueError:
        return f"param {section}"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"param {section}: {before[:40]} -> {after[:40]}"
    flat_old, flat_new = flatten(old), flatten(new)
    keys = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k, "absent") != flat_new.get(k, "absent"))
    prefix = "" if section == "(all)" else f"{section}."
    changes = [f"param {prefix}{k}: {flat_old.get(k, 'absent')} -> {flat_new.get(k, 'absent')}" for k in keys[:5]]
    return "; ".join(changes) or f"param {section}"


def _secret(value: Any, prefix: str) -> str | None:
    """The first secret-named key in a parameter value read as ``prefix``."""
    from .redact import flatten, is_secret_name

    if prefix and is_secret_name(prefix):
        return prefix
    tree = value if isinstance(value, Mapping) else {}
    return next((f"{prefix}.{key}" if prefix else key for key in flatten(tree) if is_secret_name(key)), None)


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
