"""What a job's result depends on besides its config: the project's code, its Kedro
config files and the input files its pipeline reads. Together with the config hash,
this is the job's identity: a resumed sweep skips a cell only when both match.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTENT_HASH_LIMIT = 16 * 2**20  # input files up to this size are hashed; larger ones by size and mtime
PARTS = {"code": "code", "config": "Kedro config", "data": "input data"}
UNRECORDED = "unrecorded"  # a run made before kmrun recorded fingerprints
SKIPPED_CONFIG = ("credentials", "logging")  # secrets and log set-up do not change a result


@dataclass(frozen=True)
class Fingerprint:
    code: str  # the project package's Python files
    config: str  # the Kedro config files of the env (parameters, catalog, ...)
    data: str  # the input files the pipeline reads

    @property
    def value(self) -> str:
        return _digest([self.code, self.config, self.data])

    def tags(self) -> dict[str, str]:
        return {"kmrun.fingerprint": self.value, **{f"kmrun.fp.{part}": getattr(self, part) for part in PARTS}}

    def changed(self, tags: Mapping[str, str]) -> list[str]:
        """What differs from a run's recorded fingerprint, in words ("code", "input data")."""
        if tags.get("kmrun.fingerprint") == self.value:
            return []
        if "kmrun.fingerprint" not in tags:
            return [UNRECORDED]
        return [words for part, words in PARTS.items() if tags.get(f"kmrun.fp.{part}") != getattr(self, part)]


def of_project(root: Path, package: str, env: str, catalog: Mapping[str, Any], inputs: Iterable[str]) -> Fingerprint:
    """The fingerprint of a project, an env and the datasets a pipeline reads."""
    return Fingerprint(code=code_hash(root, package), config=config_hash(root, env),
                       data=data_hash(root, catalog, inputs))


def uses_mlflow(root: Path, package: str, catalog: Mapping[str, Any]) -> bool:
    """Whether the project may log to MLflow itself: its code mentions mlflow, or its
    catalog holds kedro-mlflow's datasets. Only then must a job's run be MLflow's active run."""
    if any("kedro_mlflow" in str(entry.get("type", "")) or "kedro_mlflow" in str(entry.get("dataset", ""))
           for entry in catalog.values() if isinstance(entry, Mapping)):
        return True
    spec = importlib.util.find_spec(package)
    where = Path(spec.origin).parent if spec is not None and spec.origin else root / "src" / package
    return any("mlflow" in path.read_text(encoding="utf-8", errors="replace") for path in where.rglob("*.py"))


def code_hash(root: Path, package: str) -> str:
    spec = importlib.util.find_spec(package)
    where = Path(spec.origin).parent if spec is not None and spec.origin else root / "src" / package
    return _files_digest(where, sorted(where.rglob("*.py")))


def config_hash(root: Path, env: str) -> str:
    files = []
    for folder in ("base", env):
        for path in sorted((root / "conf" / folder).rglob("*")):
            if path.is_file() and not path.name.startswith(SKIPPED_CONFIG):
                files.append(path)
    return _files_digest(root / "conf", files)


def data_hash(root: Path, catalog: Mapping[str, Any], inputs: Iterable[str]) -> str:
    """Each input dataset stored in a local file: its path, size, mtime, and content when small."""
    parts = []
    for name in sorted(set(inputs)):
        entry = catalog.get(name)
        if not isinstance(entry, Mapping) or "filepath" not in entry or "://" in str(entry["filepath"]):
            continue
        path = Path(str(entry["filepath"]))
        path = path if path.is_absolute() else root / path
        parts.append(f"{name}={_file_state(path)}")
    return _digest(parts)


def _file_state(path: Path) -> str:
    if not path.exists():
        return "missing"
    if path.is_dir():
        return _digest(_file_state(p) for p in sorted(path.rglob("*")) if p.is_file())
    stat = path.stat()
    state = f"{stat.st_size}:{stat.st_mtime_ns}"
    if stat.st_size <= CONTENT_HASH_LIMIT:
        state = f"{stat.st_size}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return state


def _files_digest(base: Path, files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(os.fsencode(path.relative_to(base)) if path.is_relative_to(base) else os.fsencode(path))
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
