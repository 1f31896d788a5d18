"""kmrun's benchmark: per-trial overhead, parallel throughput and start-up.

    python bench/run.py            # the full run (several minutes)
    python bench/run.py --quick    # under 3 minutes
    python bench/run.py --tiny     # a smoke run for the test suite; its figures mean nothing

Every figure is a ratio or a time measured within this one run, on this machine, with the
contenders interleaved where they compete. The table is printed and written to
bench/results/latest.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
ENV.pop("MLFLOW_TRACKING_URI", None)

SIZES = {  # trials per contender, jobs per parallel sweep
    "full": {"trials": 30, "naive": 3, "parallel_jobs": 16, "runs_store": 500},
    "quick": {"trials": 10, "naive": 2, "parallel_jobs": 8, "runs_store": 500},
    "tiny": {"trials": 2, "naive": 1, "parallel_jobs": 2, "runs_store": 20},
}


def workspace(base: Path, name: str) -> Path:
    path = base / name
    shutil.copytree(ROOT / "conf", path / "conf")
    shutil.copytree(ROOT / "examples" / "digits", path / "examples" / "digits",
                    ignore=shutil.ignore_patterns("*.pkl", "*.json", "sessions", "__pycache__"))
    return path


def kmrun(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kmrun {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def children_span(cwd: Path) -> tuple[int, float]:
    """Jobs and seconds from the first child's start to the last child's end."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`kmrun.role` = 'child'", max_results=10_000)
    start = min(r.info.start_time for r in runs)
    end = max(r.info.end_time for r in runs)
    return len(runs), (end - start) / 1000


def parallel_speedup(base: Path, jobs: int) -> dict[str, float]:
    """Throughput of a CPU-bound grid (random forests) with 2 workers against 1.

    Measured on the jobs themselves (first child start to last child end), so process
    start-up, which both pay once, does not blur the ratio."""
    grid = f"params.model.n_estimators=range(100,{100 + 25 * jobs},25)"
    spans = {}
    for workers in (1, 2):
        ws = workspace(base, f"parallel{workers}")
        kmrun(ws, "-m", "+experiment=forest", grid, f"sweep.n_jobs={workers}")
        count, span = children_span(ws)
        assert count == jobs, (count, jobs)
        spans[workers] = span
    return {
        "parallel_jobs": jobs,
        "parallel_seconds_1": round(spans[1], 3),
        "parallel_seconds_2": round(spans[2], 3),
        "parallel_speedup": round(spans[1] / spans[2], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer trials: under 3 minutes")
    mode.add_argument("--tiny", action="store_true", help="1-2 trials: a smoke test, figures mean nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    n = SIZES[size]
    results: dict[str, object] = {
        "mode": size,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "versions": {p: version(p) for p in ("kmrun", "kedro", "mlflow", "optuna", "hydra-core", "scikit-learn")},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        results.update(parallel_speedup(base, n["parallel_jobs"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
