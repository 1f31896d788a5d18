"""What a job's result depends on besides its config: the project's code that the
pipeline reaches, the Kedro config it reads, the input files, and the environment.
Together with the config hash, this is the job's identity: a resumed sweep skips a cell
only when both match.

Each part is the union of the same named parts the node cache keys nodes by
(``cache.node_keys``), so resume and the cache agree on what "unchanged" means: an edit
the pipeline cannot reach (a comment, an unused module or parameters file, another
pipeline's code) moves neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kedro.pipeline import Pipeline

    from .datasets import Catalog

PARTS = {"code": "code", "config": "Kedro config", "data": "input data", "environment": "environment"}
UNRECORDED = "unrecorded"  # a run made before kmrun recorded fingerprints


@dataclass(frozen=True)
class Fingerprint:
    code: str  # the project's code the pipeline's nodes, hooks and datasets reach, and the pipeline's wiring
    config: str  # the parameters the nodes read and the catalog entries of their datasets
    data: str  # the input files and folders the pipeline reads
    environment: str  # Python, and the versions of the distributions the project uses

    @property
    def value(self) -> str:
        return _digest([self.code, self.config, self.data, self.environment])

    def tags(self) -> dict[str, str]:
        return {"kmrun.fingerprint": self.value, **{f"kmrun.fp.{part}": getattr(self, part) for part in PARTS}}

    def changed(self, tags: Mapping[str, str]) -> list[str]:
        """What differs from a run's recorded fingerprint, in words ("code", "input data")."""
        if tags.get("kmrun.fingerprint") == self.value:
            return []
        if "kmrun.fingerprint" not in tags:
            return [UNRECORDED]
        return [words for part, words in PARTS.items() if tags.get(f"kmrun.fp.{part}") != getattr(self, part)]


def of_pipeline(pipeline: Pipeline, params: Mapping[str, Any], catalog: Catalog, root: Path) -> Fingerprint:
    """The fingerprint of a pipeline run with ``params`` and ``catalog``."""
    from .cache import node_keys
    from .deps import environment

    _, _, parts = node_keys(pipeline, params, catalog, root)
    union = {name: value for node_parts in parts.values() for name, value in node_parts.items()}
    union.update({f"dist {name}": version for name, version in environment(root).items()})
    by_part: dict[str, list[str]] = {part: [] for part in PARTS}
    for name, value in sorted(union.items()):
        kind = name.split(" ")[0]
        if kind in ("code", "node"):
            part = "code"
        elif kind in ("dist", "python"):
            part = "environment"
        elif kind == "input" and not value.startswith("from "):
            part = "data"
        elif kind in ("param", "entry", "output"):
            part = "config"
        else:
            continue  # an input made by another node: its producer's parts are in the union
        by_part[part].append(f"{name}={value}")
    return Fingerprint(**{part: _digest(lines) for part, lines in by_part.items()})


def uses_mlflow(root: Path, package: str, catalog: Mapping[str, Any]) -> bool:
    """Whether the project may log to MLflow itself: its code mentions mlflow, or its
    catalog holds kedro-mlflow's datasets. Only then must a job's run be MLflow's active run."""
    if any("kedro_mlflow" in str(entry.get("type", "")) or "kedro_mlflow" in str(entry.get("dataset", ""))
           for entry in catalog.values() if isinstance(entry, Mapping)):
        return True
    spec = importlib.util.find_spec(package)
    where = Path(spec.origin).parent if spec is not None and spec.origin else root / "src" / package
    return any("mlflow" in path.read_text(encoding="utf-8", errors="replace") for path in where.rglob("*.py"))


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
