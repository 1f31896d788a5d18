"""What a job's datasets say: its metrics, and the objective among them.

A number is one metric named after its dataset, a dict gives one metric per numeric key,
and a list (or a dict of lists) is a per-step series. kedro-mlflow's shape, ``{"value":
v, "step": s}`` (or a list of those), counts as the number (or the series in step order).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import MetricError, ObjectiveMissing

if TYPE_CHECKING:
    from .schema import KmrunConf

log = logging.getLogger(__name__)


def read_metrics(
    datasets: Mapping[str, Any], names: list[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics from the captured datasets: a number is one metric named after its
    dataset, a dict gives one metric per numeric key (``DATASET.KEY`` when another dataset
    holds the same key), and a list (or a dict of lists) is a per-step series.
    kedro-mlflow's shape, ``{"value": v, "step": s}`` (or a list of those), counts as the
    number ``v`` (or the series of values in step order)."""
    scalars: dict[str, float] = {}
    series: dict[str, list[float]] = {}

    def add(name: str, value: Any) -> None:
        if is_point(value):
            value = value["value"]
        elif isinstance(value, (list, tuple)) and value and all(is_point(v) for v in value):
            value = [v["value"] for v in sorted(value, key=lambda v: v.get("step") or 0)]
        if is_number(value):
            scalars[name] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(is_number(v) for v in value):
            series[name] = [float(v) for v in value]
        else:
            log.warning("Metric '%s' is not a number or a list of numbers; it is not logged.", name)

    present = [name for name in names if name in datasets]
    seen: dict[str, int] = {}
    for name in present:
        value = datasets[name]
        for key in value if isinstance(value, Mapping) and not is_point(value) else [name]:
            seen[str(key)] = seen.get(str(key), 0) + 1
    for name in present:
        value = datasets[name]
        if isinstance(value, Mapping) and not is_point(value):
            for key, item in value.items():
                # two datasets with the same key (a pipeline under two namespaces): each keeps its own
                add(f"{name}.{key}" if seen[str(key)] > 1 else str(key), item)
        else:
            add(name, value)
    return scalars, series


def shared_keys(datasets: Mapping[str, Any], names: list[str]) -> dict[str, list[str]]:
    """Keys that more than one metrics dataset holds -> the prefixed names they were logged as."""
    out: dict[str, list[str]] = {}
    for name in names:
        value = datasets.get(name)
        if isinstance(value, Mapping) and not is_point(value):
            for key in value:
                out.setdefault(str(key), []).append(f"{name}.{key}")
    return {key: found for key, found in out.items() if len(found) > 1}


def objective_of(
    conf: KmrunConf,
    metrics: Mapping[str, float],
    series: Mapping[str, list[float]],
    datasets: Mapping[str, Any],
    saved: list[str],
) -> float | list[float] | None:
    """The value(s) of ``objective.metric``; a ``MetricError`` when missing or not finite."""
    wanted = conf.objective.metric
    if wanted is None:
        return None
    values = []
    for name in wanted if isinstance(wanted, list) else [wanted]:
        value = metrics.get(name, series[name][-1] if name in series else None)
        shared = shared_keys(datasets, conf.metrics).get(name)
        if value is None and shared:
            raise MetricError(
                f"objective.metric '{name}' is ambiguous: {len(shared)} datasets hold it, logged as "
                f"{', '.join(shared)}. Name one of them in objective.metric."
            )
        raw = _raw_value(datasets, name)
        if value is None and raw is not None:
            raise MetricError(
                f"objective.metric '{name}' is {raw!r} ({type(raw).__name__}), not a number. "
                "Make the node return a number (or a list of numbers, one per step)."
            )
        if value is None:
            produced = ", ".join(sorted({*metrics, *series})) or "none"
            raise ObjectiveMissing(
                f"objective.metric '{name}' was not produced by the pipeline.\n"
                f"Metrics read from the datasets in `metrics` ({', '.join(conf.metrics)}): {produced}.\n"
                f"Datasets the pipeline saved: {', '.join(dict.fromkeys(saved)) or 'none'}.\n"
                "Fix objective.metric, or add the dataset that holds it to `metrics`."
            )
        if not math.isfinite(value):
            raise MetricError(f"objective.metric '{name}' is {value}, not a finite number.")
        values.append(value)
    return values if isinstance(wanted, list) else values[0]


def _raw_value(datasets: Mapping[str, Any], name: str) -> Any:
    """What a metrics dataset held under ``name``, when it was not a number."""
    for key, value in datasets.items():
        if key == name:
            return value
        if isinstance(value, Mapping) and name in value:
            return value[name]
    return None


def latest(metrics: Mapping[str, float], series: Mapping[str, list[float]]) -> dict[str, float]:
    return {**{k: v[-1] for k, v in series.items()}, **metrics}


def is_point(value: Any) -> bool:
    """kedro-mlflow's metric shape: ``{"value": 0.9, "step": 0}`` (``step`` optional)."""
    return isinstance(value, Mapping) and "value" in value and set(value) <= {"value", "step", "timestamp"}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
