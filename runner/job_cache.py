"""What a job takes from the node cache, and the nodes a sweep runs once, before its
jobs, so that every job finds them (``prewarm``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import runtime
from .kedro_bridge import KedroRun

if TYPE_CHECKING:
    from .cache import NodeCache, Plan
    from .kedro_bridge import KedroProject
    from .schema import KmrunConf

log = logging.getLogger(__name__)


class JobSpec(Protocol):
    """What the cache needs of a job (``job.JobSpec``)."""

    conf: KmrunConf
    params: dict[str, Any]
    uri: str


def cache_plan(spec: JobSpec, project: KedroProject) -> tuple[NodeCache, Plan]:
    """The node cache this job uses, and what it serves for this job."""
    from . import cache

    conf = spec.conf
    root = Path(conf.cache.dir) if conf.cache.dir else cache.default_dir(spec.uri)
    store = runtime.current().node_cache(root.resolve(), conf.cache.max_gb)
    params = project.job_params(spec.params, conf.kedro.pipeline, typed=True)  # what the nodes are given
    pipeline = project.pipeline(conf.kedro.pipeline, conf.kedro.tags)
    return store, cache.plan(pipeline, params, project.catalog(spec.params), project.root, store,
                             serve=conf.cache.enabled, allow_secrets=conf.cache.secrets)


def prewarm(specs: Sequence[JobSpec], output_dir: Path, source: str) -> list[str]:
    """Run here, once, the nodes every job of a sweep shares and the cache lacks, so that
    the workers forked next find them. Returns the nodes it ran."""
    from . import cache

    if len(specs) < 2 or not specs[0].conf.cache.enabled:
        return []
    conf = specs[0].conf
    project = runtime.current().project(conf.kedro.project_path, conf.kedro.env)
    store, first = cache_plan(specs[0], project)
    others = [cache_plan(spec, project)[1] for spec in specs[1:]]
    shared = [n for n in first.run if first.keys[n] is not None and all(p.keys[n] == first.keys[n] for p in others)]
    if not shared:
        return []
    pipeline = project.pipeline(conf.kedro.pipeline, conf.kedro.tags)
    record = KedroRun(kedro_run_id(), mlflow_run_id=source, output_dir=output_dir, cache=store,
                      plan=cache.restrict(first, pipeline, shared))
    try:
        project.run(record, specs[0].params, conf.kedro.pipeline, conf.kedro.tags)
    except Exception as err:  # each job runs these nodes itself, and reports what fails
        log.warning("Could not run the shared nodes %s once for the sweep: %s", ", ".join(shared), err)
        return []
    return shared


def cache_tags(record: KedroRun) -> dict[str, str]:
    """What the run took from the cache, and from which runs; what was not cached, and why."""
    plan = record.plan
    if plan is None:
        return {"kmrun.cache": "off"}
    tags = {"kmrun.cache.hits": ",".join(plan.hits) or "none"}
    if not plan.serve:
        tags["kmrun.cache"] = "refresh"  # cache=false: computed every node, stored what it computed
    coarse = {node: parts["coarse"] for node, parts in plan.parts.items() if "coarse" in parts}
    # one line per node ("node: why"): a reason may hold "; " and ": " itself
    if coarse:
        tags["kmrun.cache.coarse"] = _lines(coarse)
    if plan.why:
        tags["kmrun.cache.misses"] = _lines(plan.why)
    if plan.hits:
        tags["kmrun.cache.from"] = ",".join(sorted(set(plan.sources.values())))[:5000]
        tags["kmrun.cache.sources"] = _lines(plan.sources)
    why = {**plan.reasons, **record.not_cached}
    if why:
        tags["kmrun.cache.not_cached"] = _lines(why)
    return tags


def _lines(by_node: dict[str, str]) -> str:
    """``node: text`` lines, within MLflow's size for a tag (the last line says how many were left out)."""
    lines = [f"{node}: {text}".replace("\n", " ") for node, text in by_node.items()]
    out: list[str] = []
    for i, line in enumerate(lines):
        if sum(len(x) + 1 for x in out) + len(line) > 4900:
            out.append(f"(and {len(lines) - i} more nodes)")
            break
        out.append(line[:1000])
    return "\n".join(out)


def kedro_run_id() -> str:
    from kedro.io.core import generate_timestamp

    return generate_timestamp()
