"""A study's search space: Hydra sweep expressions read into Optuna distributions,
checked, and the sampler that searches them."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping
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


def search_space(
    composer: Composer, yaml_space: Mapping[str, Any], arguments: list[str]
) -> tuple[list[str], dict[str, Override]]:
    """Shared overrides, and the search space: ``study.search_space`` plus the command
    line's sweep expressions, which add keys or replace them."""
    base, space = split(composer, [f"{key}={value}" for key, value in yaml_space.items()] + list(arguments))
    if not space:
        raise ConfigError(
            "Empty search space: set study.search_space in the study file, or give sweep "
            "expressions such as params.model.C='interval(0.01,10)'."
        )
    return base, space


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


def make_sampler(
    config: dict[str, Any], distributions: Mapping[str, Any], n_existing: int
) -> optuna.samplers.BaseSampler:
    """``{name: tpe, seed: 42}`` → ``TPESampler(seed=42)``. A seeded sampler resumes with
    ``seed + trials already in the study``, so it does not replay its first draws."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    options = dict(config)
    package = NEEDS.get(str(options.get("name", "")).lower())
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"study.sampler {options['name']} needs the package {package}: pip install {package}")
    if options.get("seed") is not None:
        options["seed"] = int(options["seed"]) + n_existing
    if str(options.get("name", "")).lower() == "grid":
        grid = {}
        for key, dist in distributions.items():
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
    return build_from_config(optuna.samplers, SAMPLERS, options, "study.sampler")


def corners(distributions: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every distribution at its low end, then at its high end."""
    from optuna.distributions import CategoricalDistribution

    def end(dist: Any, last: bool) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[-1 if last else 0]
        return dist.high if last else dist.low

    return [{k: end(d, last) for k, d in distributions.items()} for last in (False, True)]
