"""Soak: a 120-job grid under random kill -9 of a worker or of the whole process tree,
run again until it is done. Every job ends FINISHED exactly once, nothing stays RUNNING,
and the planted secrets are nowhere."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import child_runs
from test_faults import left_behind
from test_secrets import scan

pytestmark = pytest.mark.slow

GRID = ["-m", "+experiment=baseline", "params.split.seed=range(0,120)", "params.model.max_iter=50",
        "sweep.n_jobs=2", "+params.api_token=soak-secret-991"]


def children(ws) -> list:
    return child_runs(ws.runs())


def test_120_jobs_under_random_kill_9_finish_exactly_once(ws):
    (ws.path / "examples/digits/conf/local/credentials.yml").write_text("db:\n  password: soak-cred-552\n")
    rng = random.Random(7)
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "MY_SERVICE_TOKEN": "soak-env-313"}
    outputs, kills = [], Counter()
    for round_ in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "runner.cli", *GRID], cwd=ws.path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if round_ < 6:  # kill, at a random moment, then run again
            time.sleep(rng.uniform(8, 16))
            running = [r for r in children(ws) if r.info.status == "RUNNING"]
            if proc.poll() is None and running and rng.random() < 0.5:
                os.kill(int(running[0].data.tags["kmrun.pid"]), signal.SIGKILL)
                kills["worker"] += 1
                time.sleep(rng.uniform(1, 3))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills["tree"] += 1
        out, err = proc.communicate(timeout=900)
        outputs.append(out + err)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, outputs[-1]
    assert kills["tree"] >= 3, kills  # the faults really happened
    finished = Counter(r.data.tags["kmrun.config_hash"] for r in children(ws) if r.info.status == "FINISHED")
    assert len(finished) == 120 and set(finished.values()) == {1}
    assert ws.running() == 0
    assert scan(ws, ["soak-secret-991", "soak-cred-552", "soak-env-313"], outputs) == []
    assert left_behind(ws) == []  # no worker outlived its kmrun
