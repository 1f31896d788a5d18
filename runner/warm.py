"""What a study knows before it runs a trial: the runs already in the store
(``study.warm_start``), added as completed trials, and the param sets to try first
(``study.enqueue``).

A run becomes a trial only when its searched values lie inside the search space (its
option of each family, from its ``kmrun.groups`` tag), its objective is a finite number,
every other parameter it recorded equals the trial's (the job resolved as Kedro resolves
it: another model family, or another value of a key the study does not search, is another
experiment), and its fingerprint equals the one a trial with those values gets now: the
same code, input data and environment. This is the notion of "the same job" that a resume
uses. A run of other code is never learnt from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .records import Constraint
from .space import CONSTRAINTS, Space, constraint_system_attrs

if TYPE_CHECKING:
    from .compose import Composer

WARM_FROM = "kmrun.warm_from"  # a trial's user attribute: the run it was made from
MAX_CANDIDATES = 2000  # runs composed and fingerprinted per study start, newest first


def trials_from_runs(runs: Iterable[Any], space: Space,
                     identity_of: Callable[[dict[str, Any]], tuple[str, dict[str, str]]],
                     metrics: list[str], constraints: list[Constraint], known: set[str]) -> list[Any]:
    """Completed trials (``optuna.trial.create_trial``) made of ``runs`` that a study over
    ``space`` on the current code could have run; ``known``: run ids it holds already.
    ``identity_of(values)``: the fingerprint a trial with ``values`` gets now, and the
    params it records (as MLflow holds them, flattened to strings)."""
    import optuna

    made: list[Any] = []
    candidates = 0
    for run in runs:
        if run.info.run_id in known or run.data.tags.get("kmrun.role") == "parent":
            continue
        values = values_of(run.data.params, run.data.tags.get("kmrun.groups", ""), space)
        objective = [run.data.metrics.get(m) for m in metrics]
        if values is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in objective):
            continue
        candidates += 1
        if candidates > MAX_CANDIDATES:
            break
        fingerprint, params = identity_of(values)
        if run.data.tags.get("kmrun.fingerprint") != fingerprint:
            continue  # other code, data or environment
        if unsearched(run.data.params, values) != unsearched(params, values):
            continue  # another family, or another value of a key the study does not search
        attrs: dict[str, Any] = {"mlflow_run_id": run.info.run_id, WARM_FROM: run.info.run_id}
        violations = [c.violation(dict(run.data.metrics)) for c in constraints]
        if constraints:
            attrs[CONSTRAINTS] = violations
        made.append(optuna.trial.create_trial(
            params=values, distributions=space.active(values), values=[float(v) for v in objective], user_attrs=attrs,
            system_attrs=constraint_system_attrs([str(c) for c in constraints], violations)))
    return made


def unsearched(params: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, str]:
    """A run's params without the keys a study searches (``values``), as strings."""
    searched = {key.removeprefix("params.") for key in values}
    return {key: str(value) for key, value in params.items() if key not in searched}


def values_of(params: Mapping[str, str], groups: str, space: Space) -> dict[str, Any] | None:
    """The searched values a run's MLflow params and ``kmrun.groups`` tag hold, or None
    when one is missing or outside its distribution."""
    chosen = dict(pair.split("=", 1) for pair in groups.split(",") if "=" in pair)
    values: dict[str, Any] = {}
    wanted = dict(space.flat)
    for group, options in space.families.items():
        if chosen.get(group) not in options:
            return None
        values[group] = chosen[group]
        wanted.update(options[chosen[group]])
    for key, dist in wanted.items():
        raw = params.get(key.removeprefix("params."))
        value = None if raw is None or not key.startswith("params.") else inside(dist, raw)
        if value is None:
            return None
        values[key] = value
    return values


def inside(dist: Any, raw: Any) -> Any:
    """``raw`` (a string as MLflow stores params, or a value) as a value of ``dist``, or None."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == str(raw) or _same_number(c, raw)), None)
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or not dist.low <= number <= dist.high:
        return None
    if isinstance(dist, FloatDistribution):
        steps = (number - dist.low) / dist.step if dist.step else 0.0
        return number if abs(steps - round(steps)) < 1e-8 else None
    if not number.is_integer() or (int(number) - dist.low) % dist.step:
        return None
    return int(number)


def describe(dist: Any) -> str:
    """``interval(0.001, 10), log scale``, ``choice(0, 1)``: a distribution as the YAML wrote it."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"choice({', '.join(map(repr, dist.choices))})"
    text = f"interval({dist.low:g}, {dist.high:g})"
    text = f"int({text})" if type(dist).__name__ == "IntDistribution" else text
    return text + (", log scale" if dist.log else "") + (f", step {dist.step:g}" if dist.step not in (None, 1) else "")


def _same_number(choice: Any, raw: Any) -> bool:
    try:
        return isinstance(choice, (int, float)) and not isinstance(choice, bool) and float(raw) == float(choice)
    except (TypeError, ValueError):
        return False


def enqueued(entries: list[Any], space: Space, experiment_values: Callable[[str], dict[str, Any]]) -> list[dict]:
    """``study.enqueue`` as param sets: a mapping of searched keys (a family's group and
    its option's keys) to values, or an experiment's name, whose composed config gives the
    values. Checked: an unknown key or a value outside its range exits 2."""
    found = []
    for index, entry in enumerate(entries):
        where = f"study.enqueue[{index}]"
        values = experiment_values(str(entry)) if isinstance(entry, str) else entry
        if isinstance(entry, str) and not values:
            raise ConfigError(f"{where}: the experiment '{entry}' sets none of the keys this study searches "
                              f"({', '.join(space.names())}). Enqueue another, or a mapping of keys to values.")
        if not isinstance(values, Mapping) or not values:
            raise ConfigError(f"{where}: give a mapping of searched keys to values ({{params.model.C: 0.5}}) or an "
                              "experiment's name (baseline).")
        checked: dict[str, Any] = {}
        for key, value in values.items():
            dist = space.active(values).get(str(key))
            if dist is None:
                raise ConfigError(f"{where}: {key} is not searched by this study (it searches: "
                                  f"{', '.join(space.names())}).")
            inner = inside(dist, value)
            if inner is None:
                raise ConfigError(f"{where}: {key}={value!r} is outside its range in study.search_space "
                                  f"({describe(dist)}).")
            checked[str(key)] = inner
        found.append(checked)
    return found


def experiment_values(composer: Composer, name: str, space: Space) -> dict[str, Any]:
    """The searched keys' values in conf/experiment/<name>.yaml, composed (its option of
    each family, and that option's keys)."""
    from omegaconf import OmegaConf

    from .compose import choices_of

    cfg = composer.compose([f"+experiment={name}"])
    values = {key: OmegaConf.select(cfg, key) for key in space.flat}
    for group, options in space.families.items():
        option = str(choices_of(cfg).get(group))
        if option in options:
            values[group] = option
            values.update({key: OmegaConf.select(cfg, key) for key in options[option]})
    return {key: value for key, value in values.items() if value is not None}
