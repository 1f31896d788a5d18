"""Many jobs from one composition: a grid's cells and a study's trials.

Hydra composes what every job shares once (``JobComposer``). A job that only sets values
(``params.model.C=0.1``) is that config with its values set: copied, or, when it sets only
``params`` and the config interpolates nothing, not even copied (``params_only``). Numbers are
read without Hydra's parser (``_number``). ``spec_of`` turns a job's lines into its checked
``JobSpec``. tests/test_sources.py checks each shortcut against a full composition.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compose import Composer, origin_finder, resolved, without_hydra
from .job import JobSpec, checked, prepare

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

    from .schema import KmrunConf


class JobComposer:
    """Many job configs, cheaply. Hydra composes the overrides every job shares once; a
    job that only sets config values (``params.model.C=0.1``) is a copy of that config with
    its values set. A job that picks config groups (``model=random_forest``) goes through
    Hydra. Each call returns the job's config without Hydra's own section, and the config
    group choices Hydra made for it."""

    def __init__(self, composer: Composer, base: list[str]) -> None:
        from .schema import SECTIONS

        self.composer, self.base, self.sections = composer, list(base), SECTIONS
        self.template, self.choices = without_hydra(composer.compose(self.base))
        self._lines: dict[str, Override] = {}  # a grid repeats each value of an axis in many cells

    def parse(self, lines: list[str]) -> list[Override]:
        return [_number(line) or self._parsed(line) for line in lines]

    def _parsed(self, line: str) -> Override:
        if line not in self._lines:
            if len(self._lines) > MAX_PARSED:
                self._lines.clear()
            self._lines[line] = self.composer.parse([line])[0]
        return self._lines[line]

    def params_only(self, lines: list[str]) -> tuple[KmrunConf, dict[str, Any]] | None:
        """A job that only sets values under ``params``, typed (``schema.parse``) and plain
        (``job.resolved``) without composing or copying a config: the template's, with its
        params set as ``OmegaConf.update`` would. None when it sets anything else, or when
        the template interpolates (a value could depend on the params): compose it then."""
        from dataclasses import replace

        from .params import deep_merge

        overrides = self.parse(lines)
        if not all(self._is_value(o) and o.key_or_group.startswith("params.") and "${" not in repr(o.value())
                   for o in overrides):
            return None
        if self._typed is None:
            return None
        conf, config = self._typed
        params = config.get("params") or {}
        for override in overrides:
            value: Any = override.value()
            for part in reversed(override.key_or_group.split(".")[1:]):
                value = {part: value}
            params = deep_merge(params, value)
        params = copy.deepcopy(params)  # a job's own, as a composed config's would be
        return replace(conf, params=copy.deepcopy(params)), {**config, "params": params}

    @cached_property
    def _typed(self) -> tuple[KmrunConf, dict[str, Any]] | None:
        """The template, typed and plain; None if it interpolates or does not parse."""
        from omegaconf import OmegaConf

        from .schema import parse

        if "${" in json.dumps(OmegaConf.to_container(self.template, resolve=False), default=repr):
            return None
        try:
            return parse(self.template), resolved(self.template)
        except Exception:  # the jobs report it, each composed
            return None

    def __call__(self, lines: list[str]) -> tuple[DictConfig, dict[str, Any]]:
        from omegaconf import OmegaConf, open_dict

        overrides = self.parse(lines)
        if not all(self._is_value(o) for o in overrides):
            return without_hydra(self.composer.compose(self.base + lines))
        job = self.template.copy()
        with open_dict(job):
            for override in overrides:
                OmegaConf.update(job, override.key_or_group, override.value(), merge=True, force_add=True)
        return job, dict(self.choices)

    def _is_value(self, override: Override) -> bool:
        key = override.key_or_group
        return "." in key and key.split(".", 1)[0] in self.sections and not override.is_delete()


MAX_PARSED = 10_000  # overrides a JobComposer keeps parsed
NUMBER = re.compile(r"(params(?:\.[A-Za-z_][A-Za-z0-9_]*)+)=(-?(?:0|[1-9][0-9]*)(\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)")


def _number(line: str) -> Override | None:
    """``params.KEY=NUMBER`` as Hydra's parser reads it (an int, else a float), without the
    parser (a millisecond a line, and a grid's cells are mostly such lines); None for
    anything else, which Hydra parses."""
    from hydra.core.override_parser.types import Override, OverrideType, ValueType

    match = NUMBER.fullmatch(line)
    if match is None:
        return None
    key, text, fraction = match.groups()
    value = float(text) if fraction or "e" in text.lower() else int(text)
    return Override(type=OverrideType.FORCE_ADD, key_or_group=key, value_type=ValueType.ELEMENT, _value=value,
                    input_line=f"++{line}")


def spec_of(compose: JobComposer, lines: list[str], overrides: list[str], conf_dir: Path, open_store: bool = True,
            base_dir: Path | None = None) -> JobSpec:
    """The checked spec of the job ``compose`` makes of ``lines`` (``overrides``: all of its
    lines, the shared ones first). A job that only sets values under ``params`` is not
    composed: it is the template, typed once, with its params set."""
    typed = compose.params_only(lines)
    if typed is None:
        cfg, choices = compose(lines)
        return prepare(cfg, overrides, choices, conf_dir, open_store=open_store, base_dir=base_dir)
    origin = origin_finder(conf_dir, overrides, compose.choices)
    return checked(*typed, overrides, compose.choices, origin, open_store, base_dir)
