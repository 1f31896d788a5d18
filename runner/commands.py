"""The subcommands that read the store: runs, best, show, reproduce, promote, cache, ui, dashboard.

Each honours ``conf/kmrun.yaml`` (the store, the experiment, the objective) and
``MLFLOW_TRACKING_URI``, like a run does. Bad input raises ``KmrunError``.
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KmrunError
from .records import Constraint, feasible
from .redact import Redactor, hide_password
from .results import without_redacted
from .schema import check_experiment_name
from .store import Store, composed_config, experiment_ids, open_store, resolve_run, search
from .tracking import git_tags, resolve_uri

if TYPE_CHECKING:
    import argparse

    from mlflow import MlflowClient
    from mlflow.entities import Run


# --- join -----------------------------------------------------------------------------


def join(args: argparse.Namespace) -> list[str]:
    """The command of a sweep another machine (or terminal) started, to run here with this
    checkout and these stores (the CLI runs it). Cells and trials are shared, each runs once."""
    import shlex

    from . import terminal

    store = open_store(args)
    client = store.client()
    run = resolve_run(client, store, args.run_id)
    tags = run.data.tags
    command = tags.get("kmrun.sweep")
    if tags.get("kmrun.role") != "parent" or not command:
        raise KmrunError(f"Run {run.info.run_id} is not a sweep's parent run. Give the id kmrun printed after "
                         "\"parent run\" (or find it: kmrun runs).")
    if "***" in command:
        raise KmrunError(f"The sweep's command holds a secret, recorded as ***: type the command itself here, "
                         f"with the value: {command}")
    terminal.say(f"Joining the {tags.get('kmrun.kind', 'sweep')} of run {run.info.run_id}:\n  {command}")
    return shlex.split(command)[1:]


# --- runs -----------------------------------------------------------------------------


def runs(args: argparse.Namespace) -> int:
    from . import terminal

    store = open_store(args)
    client = store.client()
    ids = experiment_ids(store, client, args.experiment)
    if not ids:
        raise KmrunError(f"The store {hide_password(store.uri)} holds no experiment yet. "
                         "Run one: kmrun +experiment=baseline")
    found = search(client, ids, args.filter or "", _order(args.sort), args.limit)
    if not found:
        if args.filter:
            raise KmrunError(f"No runs matching {args.filter!r} in {hide_password(store.uri)}.")
        raise KmrunError(f"No runs in {hide_password(store.uri)} yet. Run one: kmrun +experiment=baseline")
    rows = [row(r, store.metric) for r in grouped(found)]
    if args.only_changed or (args.format == "table" and not args.columns):
        rows = only_changed(rows)  # a table shows the params that differ; --columns picks others
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        terminal.print_runs(rows, args.format, store.metric, columns)
    except ValueError as err:
        raise KmrunError(str(err)) from None
    return 0


def _order(sort: str | None) -> list[str]:
    if not sort:
        return ["attributes.start_time DESC"]
    key, _, way = sort.partition(" ")
    way = way.strip().upper() or ("DESC" if key.startswith("metrics.") else "ASC")
    section, _, name = key.partition(".")
    if section in ("metrics", "params", "tags") and "`" not in name:
        key = f"{section}.`{name}`"
    return [f"{key} {way}"]


def grouped(found: list[Run]) -> list[Run]:
    """Runs in search order, each parent followed by its children."""
    by_id = {r.info.run_id: r for r in found}
    children: dict[str, list[Run]] = {}
    for run in found:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent is not None and parent in by_id:
            children.setdefault(parent, []).append(run)
    out = []
    for run in found:
        if run.data.tags.get("mlflow.parentRunId") in by_id:
            continue
        out.append(run)
        out.extend(children.get(run.info.run_id, []))
    return out


def row(run: Run, metric: str | None) -> dict[str, Any]:
    info = run.info
    duration = (info.end_time - info.start_time) / 1000 if info.end_time else None
    return {
        "run_id": info.run_id,
        "name": info.run_name,
        "status": info.status,
        "start": datetime.fromtimestamp(info.start_time / 1000).isoformat(timespec="seconds"),
        "duration_s": round(duration, 2) if duration is not None else None,
        "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        "objective": run.data.metrics.get(metric) if metric else None,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
    }


def only_changed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = {k for r in rows for k in r["params"]}
    # a parent run holds no params of its own (best.* are its best child's): it tells nothing apart
    with_params = [r for r in rows if any(not k.startswith("best.") for k in r["params"])]
    changed = {k for k in keys if len({r["params"].get(k) for r in with_params}) > 1}
    return [{**r, "params": {k: v for k, v in r["params"].items() if k in changed}} for r in rows]


# --- best, show -----------------------------------------------------------------------


def best(args: argparse.Namespace) -> int:
    """``kmrun best``: the best FINISHED run, and what the ranking mixed (Kedro envs,
    versions of code and data, objectives) or left out (``--env``, ``--current``)."""
    from . import terminal

    store = open_store(args)
    client = store.client()
    parent = resolve_run(client, store, args.sweep) if args.sweep else None
    swept = _sweep_objective(client, parent) if parent is not None else {}
    metric = args.metric or swept.get("kmrun.objective") or store.metric
    if not metric:
        raise KmrunError("kmrun best needs a metric: set objective.metric in conf/kmrun.yaml or pass --metric NAME.")
    direction = args.direction or swept.get("kmrun.direction") or store.direction
    filters = ["attributes.status = 'FINISHED'", f"metrics.`{metric}` > -1e300"]
    if args.env:
        filters.append(f"tags.`kedro.env` = '{args.env}'")
    if args.current:
        current = _current_fingerprint(args)
        filters.append(f"tags.`kmrun.fingerprint` = '{current}'")
    if parent is not None:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        ids = [parent.info.experiment_id]
    else:
        ids = experiment_ids(store, client, args.experiment)
    order = f"metrics.`{metric}` {'DESC' if direction == 'maximize' else 'ASC'}"
    found = search(client, ids, " and ".join(filters), [order], 200)
    if not found:
        narrowed = (f" of Kedro env '{args.env}'" if args.env else "") + (
            " of the current code and data (--current)" if args.current else "")
        raise KmrunError(f"No FINISHED run{narrowed} with metric '{metric}' in {hide_password(store.uri)}.")
    # each run meets the constraints it ran under (its sweep's) and, outside --sweep, the config's
    rules = [] if parent is not None else _constraints(store.constraints)
    feasible_runs = [r for r in found if feasible(rules + _constraints(_own_rules(r)), r.data.metrics)]
    if not feasible_runs:
        raise KmrunError(f"No FINISHED run with metric '{metric}' meets objective.constraints "
                         f"({', '.join(map(str, rules))}) in {hide_password(store.uri)}.")
    top = feasible_runs[0]
    terminal.say(
        f"best run {top.info.run_id} ({top.info.run_name}): {metric} = {top.data.metrics[metric]:.6g} ({direction})\n"
        f"reproduce: kmrun reproduce {top.info.run_id}\npromote:   kmrun promote {top.info.run_id} --name NAME"
    )
    for line in _mixed(found, metric, args):
        terminal.say(line)
    if len(feasible_runs) < len(found):
        terminal.say(f"note: left out {len(found) - len(feasible_runs)} run(s) outside objective.constraints "
                     f"({', '.join(map(str, rules))}).")
    return 0


def _own_rules(run: Run) -> list[str]:
    text = run.data.tags.get("kmrun.constraints", "")
    return [rule.strip() for rule in text.split("; ") if rule.strip()]


def _sweep_objective(client: Any, parent: Run) -> dict[str, str]:
    """The objective a sweep ranked by: its runs' ``kmrun.objective`` and ``kmrun.direction`` tags
    (a single objective only)."""
    for run in [parent, *client.search_runs([parent.info.experiment_id], max_results=1,
                                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")]:
        tags = {k: run.data.tags[k] for k in ("kmrun.objective", "kmrun.direction") if k in run.data.tags}
        if tags and "," not in tags.get("kmrun.objective", ""):
            return tags
    return {}


def _constraints(texts: list[str]) -> list[Constraint]:
    try:
        return [Constraint.parse(text) for text in texts]
    except ValueError as err:
        raise KmrunError(f"objective.constraints: {str(err)!r} is not METRIC <= NUMBER or METRIC >= NUMBER "
                         "(conf/kmrun.yaml).") from None


def _mixed(runs: list[Run], metric: str, args: argparse.Namespace) -> list[str]:
    """What a ranking put side by side that may not compare: Kedro envs, versions of the
    code and data, runs optimised for another objective; and whether the best run's code
    is the work tree's."""
    notes = []
    envs = sorted({r.data.tags.get("kedro.env", "?") for r in runs})
    if len(envs) > 1:
        notes.append(f"note: ranked runs of {len(envs)} Kedro envs ({', '.join(envs)}); --env ENV compares one.")
    versions = {r.data.tags.get("kmrun.fingerprint", "unrecorded") for r in runs}
    if len(versions) > 1 and not args.current:
        notes.append(f"note: ranked runs of {len(versions)} versions of the code, data or environment "
                     "(kmrun.fingerprint); --current compares only runs of the current ones.")
    other = sorted({r.data.tags["kmrun.objective"] for r in runs
                    if r.data.tags.get("kmrun.objective") not in (None, metric)})
    if other:
        notes.append(f"note: some runs were optimised for another objective ({', '.join(other)}), "
                     f"not {metric}.")
    recorded = runs[0].data.tags.get("mlflow.source.git.commit")
    now = git_tags(Path.cwd()).get("mlflow.source.git.commit")
    if recorded and now and recorded != now:
        notes.append(f"note: the best run was made at commit {recorded[:10]}; the work tree is at {now[:10]}. "
                     "Its code may differ: kmrun reproduce checks, kmrun best --current compares the current code.")
    return notes


def _current_fingerprint(args: argparse.Namespace) -> str:
    """The fingerprint a run of the configured pipeline would record now."""
    from omegaconf import OmegaConf

    from . import runtime, terminal

    _, base, raw = composed_config(args)
    kedro = OmegaConf.select(raw, "kedro") or {}
    rt = runtime.current()
    with terminal.quiet_unless(args.verbose):
        project = rt.project(str(base / str(kedro.get("project_path") or ".")), kedro.get("env"))
        tags = list(kedro.get("tags") or [])
        return str(rt.fingerprint(project, str(kedro.get("pipeline") or "__default__"), tags).value)


def show(args: argparse.Namespace) -> int:
    from . import terminal

    store = open_store(args)
    client = store.client()
    run = resolve_run(client, store, args.run_id)
    artifacts = _artifacts(client, run.info.run_id)
    config = _config_text(client, run) if "config.yaml" in artifacts else None
    terminal.show_run(run, artifacts, config, f"kmrun reproduce {run.info.run_id}")
    return 0


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, item.path) if item.is_dir else [item.path])
    return out


def recorded_config(args: argparse.Namespace, run_id: str) -> tuple[Store, Run, dict[str, Any]]:
    """The store, the run, and the composed config it recorded (its config.yaml artifact)."""
    from omegaconf import OmegaConf

    store = open_store(args)
    client = store.client()
    run = resolve_run(client, store, run_id)
    if "config.yaml" not in _artifacts(client, run.info.run_id):
        raise KmrunError(f"Run {run.info.run_id} has no config.yaml artifact: it was not recorded by kmrun.")
    config = OmegaConf.to_container(OmegaConf.create(_config_text(client, run)))
    assert isinstance(config, dict)
    return store, run, {str(k): v for k, v in config.items()}


def _config_text(client: MlflowClient, run: Run) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        from .models import no_progress_bars

        with no_progress_bars():
            path = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
        return Path(path).read_text(encoding="utf-8")


# --- reproduce, promote ---------------------------------------------------------------


def reproduce(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from . import api, terminal

    _, original, config = recorded_config(args, args.run_id)
    _check_git(original, args.strict)
    config["params"] = without_redacted(config.get("params") or {})
    config["study"] = None
    config["cache"] = {"enabled": False}  # reproduce means compute again
    config.setdefault("mlflow", {}).setdefault("tags", {})["kmrun.reproduced_from"] = original.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kmrun.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
        result = api.run([], config_dir=tmp, echo=True, verbose=args.verbose)
    terminal.metric_diff(original.data.metrics, result.metrics)
    return 0


def _check_git(run: Run, strict: bool) -> None:
    from . import terminal

    recorded = run.data.tags.get("mlflow.source.git.commit")
    now = git_tags(Path.cwd())
    problems = []
    if recorded and now.get("mlflow.source.git.commit") not in (None, recorded):
        problems.append(f"the run was made at commit {recorded[:10]}, "
                        f"the work tree is at {now['mlflow.source.git.commit'][:10]}")
    if now.get("kmrun.git.dirty") == "true":
        problems.append("the work tree has uncommitted changes")
    if not problems:
        return
    message = "; ".join(problems) + f". To match the code exactly: git checkout {recorded or 'COMMIT'}"
    if strict:
        raise KmrunError(f"--strict: {message}")
    terminal.warn(message)


def promote(args: argparse.Namespace) -> int:
    from . import terminal
    from .compose import default_groups
    from .results import experiment_file

    check_experiment_name(args.name, "--name")
    store, run, config = recorded_config(args, args.run_id)
    target = store.conf_dir / "experiment" / f"{args.name}.yaml"
    if target.exists() and not args.force:
        raise KmrunError(f"{target} exists. Pick another --name, or pass --force to overwrite it.")
    overridable = default_groups(store.conf_dir)
    recorded = dict(pair.split("=", 1) for pair in run.data.tags.get("kmrun.groups", "").split(",") if "=" in pair)
    text = experiment_file(Redactor(), config, f"Promoted from run {run.info.run_id} ({run.info.run_name}).", args.name,
                           {group: option for group, option in recorded.items() if group in overridable})
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    terminal.say(f"wrote {target}\nrun it: kmrun +experiment={args.name}")
    return 0


# --- cache ----------------------------------------------------------------------------


def cache(args: argparse.Namespace) -> int:
    """``kmrun cache``: where the node cache is, its size and entries; ``clear`` empties it."""
    from omegaconf import OmegaConf

    from . import terminal
    from .cache import NodeCache, default_dir

    if args.action == "explain":
        return _explain(args)
    _, base, raw = composed_config(args)
    uri = args.tracking_uri or resolve_uri(OmegaConf.select(raw, "mlflow.tracking_uri"), base)
    configured = OmegaConf.select(raw, "cache.dir") if OmegaConf.is_dict(raw.get("cache")) else None
    store = NodeCache(base / Path(configured).expanduser() if configured else default_dir(uri), max_bytes=0)
    if args.action == "clear":
        terminal.say(f"removed {store.clear()} entries from {store.root}")
        return 0
    entries = store.entries()
    terminal.say(f"node cache {store.root}: {len(entries)} entries, {store.size() / 2**20:.1f} MB")
    terminal.cache_table([
        (entry.node, f"{path.stat().st_size / 2**10:.1f} KB", datetime.fromtimestamp(entry.created).isoformat(
            timespec="seconds"), entry.run_id[:12] or "-", path.stem[:12])
        for path, entry in sorted(entries, key=lambda item: item[1].created, reverse=True)])
    return 0


def _records(text: str) -> dict[str, str]:
    """A cache tag's ``node: text`` lines."""
    return dict(line.partition(": ")[::2] for line in text.splitlines() if ": " in line)


def _explain(args: argparse.Namespace) -> int:
    """``kmrun cache explain RUN_ID``: each node of the run, served from the cache or run, and why."""
    from . import terminal

    if not args.run_id:
        raise KmrunError("kmrun cache explain: give a run id (or a unique prefix): kmrun cache explain RUN_ID. "
                         "List runs with: kmrun runs")
    store = open_store(args)
    run = resolve_run(store.client(), store, args.run_id)
    tags = run.data.tags
    terminal.say(f"run {run.info.run_id} ({run.info.run_name}), node cache "
                 f"{ {'off': 'off', 'refresh': 'refreshed (cache=false)'}.get(tags.get('kmrun.cache', ''), 'on')}")
    sources = _records(tags.get("kmrun.cache.sources", ""))
    rows = [(node, "hit", f"computed by run {sources.get(node, tags.get('kmrun.cache.from', '?'))[:12]}")
            for node in tags.get("kmrun.cache.hits", "none").split(",") if node != "none"]
    for key, status in (("kmrun.cache.misses", "ran"), ("kmrun.cache.not_cached", "not cached"),
                        ("kmrun.cache.coarse", "coarse key")):
        for node, why in _records(tags.get(key, "")).items():
            coarse = ": keyed by all of the project's code" if key.endswith("coarse") else ""
            rows.append((node, status, why + coarse))
    if not rows and tags.get("kmrun.cache") not in ("off", "refresh"):
        terminal.say("  no node-cache records on this run (made before kmrun recorded them, or it failed first)")
    width = max((len(node) for node, _, _ in rows), default=0)
    for node, status, why in rows:
        terminal.say(f"  {node:<{width}}  {status:<10}  {why}")
    return 0
