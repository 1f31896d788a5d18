"""A study's search space: Hydra sweep expressions read into Optuna distributions,
checked, and the sampler that searches them."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .compose import as_typed
from .errors import ConfigError
from .grid import split
from .trial import build_from_config

if TYPE_CHECKING:
    import optuna
    from hydra.core.override_parser.types import Override

    from .compose import Composer

log = logging.getLogger(__name__)

SAMPLERS = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "nsgaii": "NSGAIISampler",
    "qmc": "QMCSampler",
    "grid": "GridSampler",
}
NEEDS = {"cmaes": "cmaes", "gp": "torch"}  # samplers whose package Optuna imports only when sampling


@dataclass
class Space:
    """What a study searches: ``flat`` keys in every trial, and ``families``: config groups
    whose chosen option brings its own keys (group -> option -> key -> distribution), each
    sampled only when its option is chosen (define-by-run)."""

    flat: dict[str, Any]
    families: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Every key the study may sample (groups included)."""
        return [*self.flat, *self.families, *(k for options in self.families.values()
                                              for keys in options.values() for k in keys)]

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """The family params of a trial already asked with ``flat``: its option of each
        group, then that option's keys."""
        values: dict[str, Any] = {}
        for group, options in self.families.items():
            option = trial.suggest_categorical(group, list(options))
            values[group] = option
            for key, dist in options[str(option)].items():
                values[key] = suggest(trial, key, dist)
        return values

    def active(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The distributions a trial with ``params`` drew from."""
        from optuna.distributions import CategoricalDistribution

        found = dict(self.flat)
        for group, options in self.families.items():
            if group in params:
                found[group] = CategoricalDistribution(list(options))
                found.update(options.get(str(params[group]), {}))
        return found

    def corners(self) -> list[dict[str, Any]]:
        """Every distribution at its low end, then at its high end; for each option of each
        family (the other families at their first option)."""
        flat = corners(self.flat)
        if not self.families:
            return flat
        first = {group: next(iter(options)) for group, options in self.families.items()}
        found = []
        for group, options in self.families.items():
            for option, keys in options.items():
                for end, option_end in zip(flat, corners(keys), strict=True):
                    found.append({**end, **first, group: option, **option_end})
        return found


def suggest(trial: optuna.Trial, key: str, dist: Any) -> Any:
    """``trial.suggest_*`` for an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)  # type: ignore[arg-type]
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)


def search_space(composer: Composer, yaml_space: Mapping[str, Any], arguments: list[str]) -> tuple[list[str], Space]:
    """Shared overrides, and the search space: ``study.search_space`` plus the command
    line's sweep expressions, which add keys or replace them. A key of the YAML space
    whose value is a mapping is a config group: one entry per option, with its own keys."""
    flat_yaml = {key: value for key, value in yaml_space.items() if not isinstance(value, Mapping)}
    base, flat = split(composer, [f"{key}={value}" for key, value in flat_yaml.items()] + list(arguments))
    groups = {key: value for key, value in yaml_space.items() if isinstance(value, Mapping)}
    families = _families(composer, groups) if groups else {}
    if not flat and not families:
        raise ConfigError(
            "Empty search space: set study.search_space in the study file, or give sweep "
            "expressions such as params.model.C='interval(0.01,10)'."
        )
    space = Space({key: distribution(key, override) for key, override in flat.items()}, families)
    _check_names(space)
    return base, space


def _families(composer: Composer, groups: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    known = composer.groups()
    families: dict[str, dict[str, dict[str, Any]]] = {}
    for group, options in groups.items():
        where = f"study.search_space.{group}"
        if group not in known:
            raise ConfigError(
                f"{where}: '{group}' is not a config group of {composer.config_dir} (its groups: "
                f"{', '.join(known) or 'none'}). A mapping in the search space is a group: one entry per option, "
                "each with its own keys and ranges.")
        if not options:
            raise ConfigError(f"{where} is empty: give it the options to choose from, each with its keys and ranges.")
        families[group] = {}
        for option, keys in options.items():
            if option not in known[group]:
                raise ConfigError(f"{where}.{option}: {composer.config_dir.name}/{group}/ has no option '{option}'. "
                                  f"Its options: {', '.join(known[group])}.")
            if not isinstance(keys, Mapping) or not keys:
                raise ConfigError(f"{where}.{option} is empty: give it the keys to search when {group}={option} "
                                  f"is chosen, e.g. params.model.C: interval(0.1, 10).")
            fixed, swept = split(composer, [f"{key}={value}" for key, value in keys.items()])
            if fixed:
                raise ConfigError(f"{where}.{option}: {fixed[0]} is a fixed value; an option holds ranges to search "
                                  f"(interval, int(interval), range, choice). Fixed values belong in "
                                  f"{composer.config_dir.name}/{group}/{option}.yaml.")
            families[group][str(option)] = {key: distribution(key, override) for key, override in swept.items()}
    return families


def _check_names(space: Space) -> None:
    """One name, one kind of distribution: Optuna keeps a parameter's name across trials."""
    from optuna.distributions import check_distribution_compatibility

    seen: dict[str, tuple[str, Any]] = {key: ("the flat space", dist) for key, dist in space.flat.items()}
    for group, options in space.families.items():
        if group in seen:
            raise ConfigError(f"study.search_space: {group} is searched twice, as a family and as a flat expression; "
                              "keep one.")
        for option, keys in options.items():
            for key, dist in keys.items():
                where, other = seen.setdefault(key, (f"{group}.{option}", dist))
                try:
                    check_distribution_compatibility(other, dist)
                except ValueError:
                    raise ConfigError(
                        f"study.search_space.{group}.{option}: {key} is searched with another kind of range in "
                        f"{where}. One name takes one kind (interval, int(interval), or the same choice()) "
                        "across options.") from None


def distribution(key: str, override: Override) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution from a Hydra sweep expression, checked."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    log = "log" in getattr(sweep, "tags", set())
    where = f"study.search_space {as_typed([str(override.input_line)])[0]}"
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{where}: both ends of the interval must be finite numbers.")
        if not low < high:
            raise ConfigError(f"{where}: the interval is empty or inverted; write interval(LOW, HIGH) with LOW < HIGH.")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log scale needs LOW > 0 (got {low}).")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if isinstance(start, int) and isinstance(stop, int) and isinstance(step, int):
            values = list(range(start, stop, step))
            if not values:
                raise ConfigError(f"{where}: range() is empty.")
            return IntDistribution(values[0], values[-1], step=step, log=log)
        floats = [float(v) for v in override.sweep_iterator()]  # type: ignore[arg-type]
        if not floats:
            raise ConfigError(f"{where}: range() is empty.")
        return CategoricalDistribution(floats)
    if isinstance(sweep, ChoiceSweep):
        choices = [str(c) if isinstance(c, (list, dict)) else c for c in sweep.list]
        if not choices:
            raise ConfigError(f"{where}: choice() is empty.")
        return CategoricalDistribution(choices)  # type: ignore[arg-type]
    raise ConfigError(f"{where}: use interval(), int(interval()), range(), choice() or tag(log, ...).")


def make_sampler(config: dict[str, Any], space: Space, n_existing: int,
                 constrained: bool = False) -> optuna.samplers.BaseSampler:
    """``{name: tpe, seed: 42}`` → ``TPESampler(seed=42)``. A seeded sampler resumes with
    ``seed + trials already in the study``, so it does not replay its first draws. With
    ``constrained``, a sampler that takes Optuna's ``constraints_func`` (TPE, NSGA-II, GP)
    learns from each trial's constraint values (``CONSTRAINTS``)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    options = dict(config)
    package = NEEDS.get(str(options.get("name", "")).lower())
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"study.sampler {options['name']} needs the package {package}: pip install {package}")
    if options.get("seed") is not None:
        options["seed"] = int(options["seed"]) + n_existing
    if str(options.get("name", "")).lower() == "grid":
        if space.families:
            family = next(iter(space.families))
            raise ConfigError(
                f"study.sampler grid cannot search a conditional space (study.search_space.{family}: each option has "
                f"its own keys). Use tpe or random, or run a grid (-m) per option: {family}=OPTION with its values.")
        grid = {}
        for key, dist in space.flat.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                raise ConfigError(
                    f"study.sampler grid needs discrete values, but {key} is a continuous interval. "
                    "Use choice() or range() for it, or another sampler."
                )
        options.setdefault("search_space", grid)
    name = SAMPLERS.get(str(options.get("name", "")).lower())
    takes = name and "constraints_func" in inspect.signature(getattr(optuna.samplers, name)).parameters
    if constrained and takes and not hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna 5: set on the trial
        options.setdefault("constraints_func", constraint_values)
    return build_from_config(optuna.samplers, SAMPLERS, options, "study.sampler")


CONSTRAINTS = "kmrun.constraints"  # a trial's user attribute: each constraint's violation (≤ 0: met)


def constraint_values(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's ``constraints_func`` (before Optuna 5): what kmrun stored on the trial
    before telling it."""
    return [float(v) for v in trial.user_attrs.get(CONSTRAINTS, [math.inf])]


def set_constraints(trial: optuna.Trial, names: list[str], values: list[float]) -> None:
    """A finished trial's constraint values, where the sampler reads them: the trial's
    ``kmrun.constraints`` attribute (kmrun's own reading, and ``constraints_func`` before
    Optuna 5), and, from Optuna 5, ``Trial.set_constraint``."""
    trial.set_user_attr(CONSTRAINTS, values)
    if hasattr(trial, "set_constraint"):
        for name, value in zip(names, values, strict=True):
            trial.set_constraint(name, value)


def constraint_system_attrs(names: list[str], values: list[float]) -> dict[str, float]:
    """What ``Trial.set_constraint`` stores (Optuna 5), for a trial made whole (a warm start);
    before Optuna 5, ``constraints_func`` reads the user attribute instead."""
    import optuna
    from optuna.study import _constrained_optimization  # the key set_constraint writes: no public name

    if not hasattr(optuna.trial.Trial, "set_constraint"):
        return {}
    return {f"{_constrained_optimization._CONSTRAINTS_KEY}:{n}": v for n, v in zip(names, values, strict=True)}


def corners(distributions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every distribution at its low end, then at its high end."""
    from optuna.distributions import CategoricalDistribution

    def end(dist: Any, last: bool) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[-1 if last else 0]
        return dist.high if last else dist.low

    return [{k: end(d, last) for k, d in distributions.items()} for last in (False, True)]


_ABSENT = object()


def check_options(space: Space, compose: Callable[[list[str]], Any], groups: Mapping[str, list[str]],
                  conf_dir: str) -> None:
    """A key of an option that the option's config does not set, but another option of
    its group does: searched where it means nothing (a typo, or under the wrong option).
    Keys no option of the group sets are Kedro parameters, checked as every key is.
    ``compose``: a job's config from override lines; ``groups``: every option of each group."""
    from omegaconf import OmegaConf

    for group, options in space.families.items():
        sets = {option: compose([f"{group}={option}"]) for option in groups.get(group, options)}
        for option, keys in options.items():
            for key in keys:
                where = [o for o, cfg in sets.items() if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT]
                if where and option not in where:
                    raise ConfigError(
                        f"study.search_space.{group}.{option}: {key} is not in the config of {group}={option} "
                        f"(it is in {group}={where[0]}). Search it under {where[0]}, or add it to "
                        f"{conf_dir}/{group}/{option}.yaml.")
