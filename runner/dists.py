"""Installed distributions: which provide a top-level module, and their versions (with
a digest of what they installed) and those of the distributions they require."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as metadata
import re
import sys
from pathlib import Path


@functools.cache
def distributions(top: str) -> dict[str, str]:
    """The distributions providing the top-level module ``top``, with those they require,
    as name: version (and a digest of the files it installed)."""
    names = [top] if _distribution(top) is not None else _providers(top)  # most are named as their module
    out: dict[str, str] = {}
    todo = list(names)
    while todo:
        found = _distribution(todo.pop())
        if found is None or found[0] in out:
            continue
        key, version, requires = found
        out[key] = version
        todo += requires
    return dict(sorted(out.items()))


@functools.cache
def _distribution(name: str) -> tuple[str, str, list[str]] | None:
    """An installed distribution's normalized name, its version with a digest of its RECORD
    (a reinstall of other files under the same version), and the distributions it always
    requires. Read from its METADATA lines, which costs far less than parsing the message."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    headers = text.split("\n\n", 1)[0].splitlines()
    version = next((line.split(":", 1)[1].strip() for line in headers if line.startswith("Version:")), "?")
    requires = [re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0] for line in headers
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    record = dist.read_text("RECORD") or ""
    if record:
        version += f" {hashlib.sha256(record.encode()).hexdigest()[:8]}"
    source = _editable_source(dist)
    if source is not None:  # pip install -e: its code is its source folder, whatever the version says
        version += f" source {_source_digest(source)}"
    return re.sub(r"[-_.]+", "-", name).lower(), version, requires


def _editable_source(dist: metadata.Distribution) -> Path | None:
    import json
    from urllib.parse import unquote, urlparse

    text = dist.read_text("direct_url.json")
    try:
        info = json.loads(text) if text else {}
    except ValueError:
        return None
    if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file://"):
        return Path(unquote(urlparse(info["url"]).path))
    return None


def _source_digest(folder: Path) -> str:
    """Every Python file under ``folder`` (virtual environments and hidden folders left out),
    by its content."""
    import os

    digest = hashlib.sha256()
    for where, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")
                         and not os.path.exists(os.path.join(where, d, "pyvenv.cfg")))
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(where, name)
            try:
                with open(path, "rb") as handle:
                    digest.update(f"{os.path.relpath(path, folder)}\0".encode() + handle.read())
            except OSError:
                continue
    return digest.hexdigest()[:12]


def _providers(top: str) -> list[str]:
    """The distributions that installed the top-level module ``top``: read from the
    ``*.dist-info`` folders beside it (``top_level.txt``, else ``RECORD``), which costs far
    less than ``importlib.metadata.packages_distributions()`` over every distribution."""
    where = getattr(sys.modules.get(top), "__file__", None)
    if not where:
        return []
    site = Path(where).parent.parent if Path(where).name == "__init__.py" else Path(where).parent
    found = []
    for info in sorted(site.glob("*.dist-info")):
        try:
            tops = (info / "top_level.txt").read_text().split()
        except OSError:
            tops = None
        if tops is not None and top in tops:
            found.append(info.name.split("-")[0])
        elif tops is None:
            try:
                record = (info / "RECORD").read_text()
            except OSError:
                continue
            if record.startswith((f"{top}/", f"{top}.py")) or f"\n{top}/" in record or f"\n{top}.py," in record:
                found.append(info.name.split("-")[0])
    return found


def forget() -> None:
    """Drop what was read: distributions may have been installed or removed since."""
    _distribution.cache_clear()
    distributions.cache_clear()
