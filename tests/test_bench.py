"""The benchmark runs and writes every key; its figures are not checked (a noisy machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"overhead_ratio", "study_overhead_ratio", "overhead_ms_per_trial", "parallel_speedup", "help_seconds",
        "first_trial_ratio", "runs_query_seconds_500", "naive_seconds_per_trial", "cpu_count", "versions",
        "cached_ratio", "uncached_ratio", "cached_study_seconds_per_trial", "show_ratio", "show_seconds_big_store",
        "ray_overhead_ms_per_trial", "ray_two_node_speedup", "model_parallel_speedup", "grid_check_ms_per_cell",
        "kedro_run_ratio", "kedro_run_ratio_no_daemon", "first_trial_ratio_daemon"}
PREFIXES = ("read_commands_seconds_", "dry_run_peak_mb_", "dry_run_seconds_")


@pytest.mark.slow
def test_the_benchmark_runs_in_tiny_mode_and_writes_every_key(tmp_path):
    out = tmp_path / "latest.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= KEYS, KEYS - set(results)
    assert all(any(k.startswith(prefix) for k in results) for prefix in PREFIXES)
    assert results["mode"] == "tiny" and results["versions"]["kmrun"]
    assert "postgres_workers_speedup" in results or results["postgres"].startswith("not measured: ")
