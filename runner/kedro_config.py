"""Kedro's config files, parsed once per process and parsed again only when one changes.

This replaces a private method of Kedro's ``OmegaConfigLoader`` (``_read_raw_config``):
Kedro has no public seam for it. tests/test_imports.py checks that the name still exists,
so a Kedro upgrade that drops it fails a test, not a user. Kedro before 1.7 has no such
method: there the loader is left as it is (each job parses the files again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ParsedConfig:
    """Kedro's config files, parsed once while none of them changes.

    Kedro's config loader finds (three glob patterns per key) and parses every file again
    for each key, on every run: in a sweep that is paid once per job. Here the parse of a
    key's files is kept per conf folder, env and patterns, and reused while no file in the
    conf folder changed (size and mtime). Merging and resolving still happen per run, so
    runtime params, globals and custom resolvers behave as in ``kedro run``. Credentials
    are always read afresh (they resolve environment variables while being read).
    Loaders that read from anywhere but local files are left as they are.
    """

    def __init__(self) -> None:
        self._parsed: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def attach(self, loader: Any) -> Any:
        from kedro.config import OmegaConfigLoader

        if not isinstance(loader, OmegaConfigLoader) or getattr(loader, "_protocol", None) != "file" \
                or not hasattr(loader, "_read_raw_config"):
            return loader
        read = loader._read_raw_config

        def cached(key: str) -> tuple[Any, ...]:
            if key == "credentials" or key not in loader.config_patterns:
                return read(key)
            slot = (loader.conf_source, loader.env, loader.base_env, loader.default_run_env, key,
                    tuple(loader.config_patterns[key]), loader.ignore_hidden)
            stamp = _stamp(Path(loader.conf_source))
            hit = self._parsed.get(slot)
            if hit is None or hit[0] != stamp:
                base, env, base_path, env_path, files = read(key)
                hit = (stamp, _plain(base), _plain(env), base_path, env_path, frozenset(files))
                self._parsed[slot] = hit
            _, base, env, base_path, env_path, files = hit
            return _configs(base), _configs(env), base_path, env_path, set(files)

        loader._read_raw_config = cached  # type: ignore[method-assign]
        return loader


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``folder`` with its size and mtime: changes when any file does."""
    import os

    found = []
    for where, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(where, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            found.append((path, st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def _plain(configs: dict[Path, Any]) -> dict[Path, Any]:
    from omegaconf import OmegaConf

    return {path: OmegaConf.to_container(config, resolve=False) for path, config in configs.items()}


def _configs(plain: dict[Path, Any]) -> dict[Path, Any]:
    """Fresh DictConfigs: Kedro merges into the first one in place."""
    from omegaconf import OmegaConf

    return {path: OmegaConf.create(data) for path, data in plain.items()}
