"""The node cache proven by difference: a Kedro project written with everyday Python
patterns (tests/mutation_project.py), mutated one edit at a time. After each edit, a default
run (cache on) must record the same metrics as a ``cache=false`` run of the same code (no
stale hit), each edit must move the ``cache=false`` result (or, for the edits that change
nothing, leave it), and the nodes the edit cannot reach must be served from the cache.

The cached runs go through the daemon (a zygote forks each command); the ``cache=false``
runs alternate between the daemon and plain processes, so a served command is compared with
a plain one too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kedro_projects import pip, project
from mutation_project import ALL, CATALOG, EDITS, FILES, KMRUN, PARAMETERS, PIPELINE

pytestmark = pytest.mark.slow
NEEDLESS_SHARE = 0.05  # of the node runs over the edits that change nothing


def kmrun(where: Path, env: dict[str, str], *args: str, daemon: bool = True, uri: str | None = None) -> dict:
    """Run kmrun; return each run it made (by run name) with its metrics, and the nodes that ran."""
    from mlflow import MlflowClient

    started = int(time.time() * 1000) - 1
    if "-m" in args:  # a grid run again resumes (skips its finished cells): here every cell must run
        args = (*args, "sweep.rerun=true")
    full = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **env, "KMRUN_DAEMON": "1" if daemon else "0"}
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=where, env=full, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(uri or f"sqlite:///{where / 'mlflow.db'}")
    runs = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          filter_string=f"attributes.start_time >= {started}", max_results=100)]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags] or runs
    assert children, f"kmrun {' '.join(args)} made no run"
    ran = set()
    for run in children:
        ran |= ALL - (set(run.data.tags["kmrun.cache.hits"].split(",")) - {"none"})
    return {"metrics": {r.info.run_name if len(children) > 1 else "": r.data.metrics for r in children},
            "params": {r.info.run_name if len(children) > 1 else "": r.data.params for r in children},
            "ran": ran, "misses": " | ".join(r.data.tags.get("kmrun.cache.misses", "") for r in children)}


@pytest.fixture
def daemon_env(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime), "KMRUN_DAEMON_IDLE": "300"}
    yield env
    subprocess.run([sys.executable, "-m", "runner.cli", "daemon", "stop"], env={**os.environ, **env},
                   capture_output=True, timeout=60)


def apply(where: Path, edit: tuple, libraries: tuple, env: dict[str, str]) -> None:
    what, path, old, new = edit[:4]
    if path is None:
        return
    if path.startswith("pip:"):
        pip("install", "--no-deps", "--no-index", "--force-reinstall", str(libraries[0][new]))
    elif path.startswith("env:"):
        env[path[4:]] = new
    else:
        target = libraries[1] if path == "edlib" else where / path
        if old is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(new.encode())
            return
        text = target.read_bytes().decode()
        assert old in text, f"{what}: {old!r} is not in {path}"
        target.write_bytes(text.replace(old, new).encode())


def test_cached_runs_equal_fresh_runs_after_every_kind_of_edit(tmp_path, template_store, libraries, daemon_env):
    assert len(EDITS) >= 60
    root = tmp_path / "ws"
    where = project(root, "mutp", PIPELINE, {**FILES, "conf/base/parameters.yml": PARAMETERS}, {}, CATALOG, KMRUN,
                    template_store)
    env = dict(daemon_env)
    previous = kmrun(root, env)["metrics"][""]
    stale, needless, report = [], [], []
    noop_runs = noop_needless = 0
    for number, edit in enumerate(EDITS):
        what, _, _, _, args, expected, moves = edit
        apply(where, edit, libraries, env)
        cached = kmrun(root, env, *args)
        fresh = kmrun(root, env, *args, "cache=false", daemon=number % 4 != 0)
        if cached["metrics"] != fresh["metrics"] or not expected <= cached["ran"]:
            stale.append(f"{what}: ran {sorted(cached['ran'])}, metrics {cached['metrics']} != {fresh['metrics']}")
        extra = cached["ran"] - expected
        if extra:
            needless.append(f"{what}: {sorted(extra)}")
        if not moves:
            noop_runs += len(ALL)
            noop_needless += len(extra)
        if "+params.seed=1,2" in args:  # each cell ran with its own runtime param, and records it, cached or not
            assert sorted(p["clean.seed"] for p in cached["params"].values()) == ["1", "2"], cached["params"]
        moved = any(metrics != previous for metrics in fresh["metrics"].values())
        assert moved == moves, f"{what}: the edit must {'' if moves else 'not '}move the result"
        report.append(f"{what:<58} ran {len(cached['ran']):>2} (needed {len(expected):>2})  {cached['misses'][:150]}")
        if args:  # the next edit is compared with a plain run of the default config
            previous = kmrun(root, env, "cache=false")["metrics"][""]
        else:
            previous = fresh["metrics"][""]
    print("\n".join(report))
    print(f"edits: {len(EDITS)}  stale: {len(stale)}  needless over the no-op edits: {noop_needless} of {noop_runs} "
          f"node runs\nneedless (every edit): " + "\n  ".join(needless))
    assert stale == [], "stale cache hits:\n" + "\n".join(stale)
    assert noop_needless <= NEEDLESS_SHARE * noop_runs, needless
    # the refreshed entries are served afterwards: a default run after cache=false reruns nothing,
    # and the project's pipeline hooks still run for it
    # a typed section checks like any other: a typo, a wrong type, and a field the dataclass lacks exit 2
    for bad, says in (("params.model.alpah=0.3", "params.model.alpah"), ("params.model.alpha=abc", "params.model.alpha"),
                      ("+params.model.delta=1", "delta")):
        done = subprocess.run([sys.executable, "-m", "runner.cli", bad], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **env, "KMRUN_DAEMON": "0"})
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    log = where / "data" / "pipeline_runs.txt"
    before = log.read_text().count("\n")
    assert kmrun(root, env)["ran"] == set()
    assert log.read_text().count("\n") == before + 1
