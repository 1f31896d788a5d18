"""Where a project's datasets live: catalog entries resolved as Kedro resolves them for
one job (its runtime params applied, dataset factory patterns matched), their files and
folders, and the state of those files.

Every reader of the catalog goes through here: node keys, fingerprints, per-job output
folders, ``artifacts:`` and ``model.dataset``, so a dataset named by a factory pattern
(``"{namespace}.metrics"``) or placed by ``${runtime_params:...}`` is found the same way
everywhere.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CONTENT_HASH_LIMIT = 16 * 2**20  # files up to this size are hashed; larger ones by size and mtime
LOCATION_KEYS = ("filepath", "path")  # most datasets say `filepath`; partitioned and folder datasets `path`
MEMORY = "kedro.io.MemoryDataset"


class Catalog:
    """One job's catalog: entries by name, factory patterns resolved on demand."""

    def __init__(self, config: Mapping[str, Any], root: Path) -> None:
        from kedro.io.catalog_config_resolver import CatalogConfigResolver

        self.root = root
        # credentials are referred to by name only: their values never enter a key or a log
        plain = {name: _without_credentials(entry) for name, entry in config.items() if isinstance(entry, Mapping)}
        self._resolver = CatalogConfigResolver(plain, {}, default_runtime_patterns={"{default}": {"type": MEMORY}})
        self.explicit = {name: entry for name, entry in plain.items() if not CatalogConfigResolver.is_pattern(name)}
        self.patterns = sorted(name for name in plain if CatalogConfigResolver.is_pattern(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.entry(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.explicit)

    def entry(self, name: str) -> dict[str, Any] | None:
        """The dataset's resolved entry; None when neither the catalog nor a factory pattern
        names it (Kedro then keeps it in memory)."""
        if name in self.explicit:
            return dict(self.explicit[name])
        if not self.patterns or (self._resolver.match_dataset_pattern(name) is None \
                and self._resolver.match_user_catch_all_pattern(name) is None):
            return None
        resolver_log = logging.getLogger("kedro.io.catalog_config_resolver")
        level = resolver_log.level
        resolver_log.setLevel(logging.ERROR)  # Kedro says so itself when it creates the dataset
        try:
            found = self._resolver.resolve_pattern(name)
        finally:
            resolver_log.setLevel(level)
        return dict(found) if isinstance(found, Mapping) and found.get("type") != MEMORY else None

    def location(self, name: str) -> Path | str | None:
        """The dataset's local file or folder (absolute); the URL when it is remote; None
        when it has neither (a database table, an API, memory)."""
        entry = self.entry(name)
        where = _location(entry)
        if where is None:
            return None
        if "://" in where and not where.startswith("file://"):
            return where
        path = Path(where.removeprefix("file://"))
        return path if path.is_absolute() else self.root / path

    def files(self) -> list[str]:
        """The explicit entries stored in local files (for messages)."""
        return sorted(name for name in self.explicit if isinstance(self.location(name), Path))

    def state(self, name: str) -> str | None:
        """The state of a dataset's local file or folder (None: it has none kmrun can read)."""
        where = self.location(name)
        if not isinstance(where, Path):
            return None
        suffix = (self.entry(name) or {}).get("filename_suffix")  # a partitioned dataset reads only these
        return file_state(where, suffix if isinstance(suffix, str) else "")


def _location(entry: Mapping[str, Any] | None) -> str | None:
    if not isinstance(entry, Mapping):
        return None
    for key in LOCATION_KEYS:
        if isinstance(entry.get(key), str | Path):
            return str(entry[key])
    inner = entry.get("dataset")  # a wrapper (kedro-mlflow's artifact dataset, a partitioned one)
    return _location(inner) if isinstance(inner, Mapping) else None


def _without_credentials(entry: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        if key == "credentials":  # kept by name only, under a key Kedro's resolver does not look up
            key, value = "credentials (name)", value if isinstance(value, str) else "<inline>"
        elif isinstance(value, Mapping):
            value = _without_credentials(value)
        out[key] = value
    return out


def file_state(path: Path, suffix: str = "") -> str:
    """A file's size and content digest (size and mtime when large); a folder's files,
    each by name; a glob's matches."""
    if any(ch in path.name for ch in "*?["):
        return _digest(f"{p}:{file_state(Path(p))}" for p in sorted(glob.glob(str(path), recursive=True)))
    if not path.exists():
        return "missing"
    if path.is_dir():
        # every file counts, .DS_Store and editor backups too: a folder dataset without a
        # filename_suffix reads them, and a needless rerun is better than a stale result; with
        # one, it reads only the files that end with it (Kedro's PartitionedDataset), and so
        # only those count
        return _digest(f"{p.relative_to(path)}:{file_state(p)}" for p in sorted(path.rglob("*"))
                       if p.is_file() and p.name.endswith(suffix))
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    slot = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if slot not in _HASHED:  # each job of a sweep reads the same inputs: hash each version once
        _HASHED[slot] = f"{stat.st_size}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return _HASHED[slot]


_HASHED: dict[tuple[Path, int, int, int], str] = {}
def _digest(parts: Any) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
