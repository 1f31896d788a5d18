"""``kmrun init``: add kmrun's config to an existing Kedro project, touching none of Kedro's files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import runtime
from .errors import KmrunError
from .kedro_bridge import read_package_name

KMRUN_YAML = """\
# kmrun's config for this Kedro project. Every key: kmrun's docs/config.md.
kedro:
  project_path: .                 # this project
  env: null                       # null: the project's default run env
  pipeline: __default__
  tags: []

params: {{}}                        # Kedro parameter overrides; experiments set them

mlflow:
  tracking_uri: null              # null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
  experiment_name: null           # null: {package}
  run_name: null
  tags: {{}}

objective:
  metric: {metric}                # the metric sweeps optimise{metric_note}
  direction: maximize

metrics: {metrics}                # Kedro datasets that hold metrics (a number, a dict, or lists)

verbose: false
"""

STUDY_YAML = """\
# @package _global_
# A first Optuna study over the project's numeric parameters (ranges around their values):
#   kmrun -m +experiment=baseline +study=example
study:
  n_trials: 20
  sampler: {{name: tpe, seed: 42}}
  pruner: {{name: none}}          # median: nodes report with: from runner import report; report(value, step)
  search_space:
{space}
objective:
  metric: {metric}
  direction: maximize
"""

STUDY_INACTIVE = """\
# @package _global_
# An example Optuna study, inactive: {why}. Uncomment, set what is missing, then:
#   kmrun -m +experiment=baseline +study=example
#
# study:
#   n_trials: 20
#   sampler: {{name: tpe, seed: 42}}
#   search_space:
#     {key}: {expression}
# objective:
#   metric: {metric}
#   direction: maximize
"""

KEDRO_MLFLOW_YML = """\
# kedro-mlflow logs `kedro run` to kmrun's store (MLflow 3 refuses kedro-mlflow's default ./mlruns).
server:
  mlflow_tracking_uri: sqlite:///mlflow.db
"""
# not what a study tunes: randomness, resources, and how the data is split (scores on other splits do not compare)
NOT_SEARCHED = re.compile(r"seed|random_state|verbose|n_jobs|workers|port|epochs?$|test_size|val|holdout|split|fold",
                          re.IGNORECASE)


GITIGNORE = ("mlflow.db", "mlflow.db.lock", "mlartifacts/", "optuna.db", "optuna.db.lock", "multirun/",
             "outputs/", "kmrun-cache/")
MINIMIZE = re.compile(r"loss|error|err$|rmse|mse|mae|mape|brier|logloss|perplexity", re.IGNORECASE)


def init(root: Path, run: bool = True, kedro_mlflow: bool = False) -> tuple[list[Path], list[str]]:
    """Write conf/kmrun.yaml, conf/experiment/baseline.yaml and conf/study/example.yaml,
    and add kmrun's files to .gitignore. With ``run``, the pipeline runs once (no MLflow
    run) to find the outputs that hold metrics. Returns the files written and notes."""
    from omegaconf import OmegaConf

    package = read_package_name(root)
    conf = root / "conf"
    targets = [conf / "kmrun.yaml", conf / "experiment" / "baseline.yaml", conf / "study" / "example.yaml"]
    existing = [str(t.relative_to(root)) for t in targets if t.exists()]
    if existing:
        raise KmrunError(f"kmrun init would overwrite {', '.join(existing)}. "
                         "Move them away first; kmrun init never overwrites.")
    project = runtime.current().project(root, None)
    params = project.parameters()
    metrics, values, notes = _find_metrics(project, run)
    objective = next(iter(values), None)
    direction = "minimize" if objective and MINIMIZE.search(objective) else "maximize"
    note = (f"; {direction} (from the pipeline's {metrics[0]})" if objective else
            "; add the dataset holding it to `metrics` and name it here")
    space = search_space(params)
    if space and objective:
        study = STUDY_YAML.format(space="".join(f"    {k}: {e}\n" for k, e in space).rstrip("\n"), metric=objective)
    else:
        why = "no metric was found (set objective.metric)" if space else "no numeric parameter was found"
        key, expression = space[0] if space else ("params.SOME_FLOAT", "interval(0.1, 1.0)")
        study = STUDY_INACTIVE.format(why=why, key=key, expression=expression, metric=objective or "CHANGE_ME")
    texts = [
        KMRUN_YAML.format(package=package, metric=objective or "null", metric_note=note,
                          metrics=f"[{', '.join(metrics)}]").replace("direction: maximize", f"direction: {direction}"),
        "# @package _global_\n# The baseline: the project's own parameters, to edit.\n#   kmrun +experiment=baseline\n"
        + OmegaConf.to_yaml(OmegaConf.create({"mlflow": {"run_name": "baseline"}, "params": params})),
        study.replace("direction: maximize", f"direction: {direction}"),
    ]
    for target, text in zip(targets, texts, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    added = _ignore(root / ".gitignore")
    if added:
        notes.append(f".gitignore: added {', '.join(added)}")
    written = [*targets, root / ".gitignore"]
    notes += _kedro_mlflow(root, write_config=kedro_mlflow, written=written)
    return written, notes


def _kedro_mlflow(root: Path, write_config: bool, written: list[Path]) -> list[str]:
    """With kedro-mlflow installed and no store of its own set, ``kedro run`` would fail
    (its default ./mlruns is refused by MLflow 3): say the line that points it at kmrun's
    store, or, with ``--kedro-mlflow``, write conf/local/mlflow.yml when it is missing."""
    import importlib.util

    if importlib.util.find_spec("kedro_mlflow") is None:
        return []
    target = root / "conf" / "local" / "mlflow.yml"
    if target.exists() and "mlflow_tracking_uri" in target.read_text(encoding="utf-8") and \
            not re.search(r"mlflow_tracking_uri:\s*(null|mlruns)?\s*(#.*)?$", target.read_text(encoding="utf-8"), re.M):
        return []  # it has a store of its own
    if write_config and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(KEDRO_MLFLOW_YML, encoding="utf-8")
        written.append(target)
        return ["kedro-mlflow: wrote conf/local/mlflow.yml, so that `kedro run` logs to kmrun's store (mlflow.db)"]
    where = "set in conf/local/mlflow.yml" if target.exists() else "add conf/local/mlflow.yml with"
    return [f"kedro-mlflow is installed: MLflow 3 refuses its default store (./mlruns), so `kedro run` fails. To log "
            f"where kmrun does, {where}:  server: {{mlflow_tracking_uri: sqlite:///mlflow.db}}"
            + ("" if target.exists() else "  (or run kmrun init --kedro-mlflow to write it)")]


def _find_metrics(project: Any, run: bool) -> tuple[list[str], list[str], list[str]]:
    """Datasets that hold a number or a dict of numbers: the pipeline's free outputs (after
    one run) and catalog datasets named like metrics. Returns them, the metric names they
    hold, and notes."""
    import math

    catalog = project.catalog()
    named = sorted(name for name in catalog if "metric" in name.lower() and not name.startswith("_"))
    if not run:
        return named, [], ["the pipeline was not run (--no-run): `metrics` lists datasets named like metrics"]
    from .kedro_bridge import KedroRun

    pipeline = project.pipeline("__default__", [])
    candidates = set(pipeline.all_outputs()) - set(catalog) | set(named)
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as scratch:  # what it writes goes here, not into the project
            record = KedroRun("kmrun-init", capture=candidates, output_dir=Path(scratch))
            project.run(record, {}, "__default__", [])
    except Exception as err:
        return named, [], [f"the pipeline failed when run once ({type(err).__name__}: {err}); "
                           "`metrics` lists datasets named like metrics"]

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    from .metrics import read_metrics

    found = [name for name in sorted(record.datasets, key=lambda n: ("metric" not in n.lower(), n))
             if number(record.datasets[name]) or (isinstance(record.datasets[name], dict) and record.datasets[name]
             and all(number(v) for v in record.datasets[name].values()))]
    values = list(read_metrics(record.datasets, found)[0])  # named as runs log them (DATASET.KEY when shared)
    notes = [f"ran the pipeline once: metrics in {', '.join(found)} ({', '.join(values)})" if found else
             "ran the pipeline once: no output holds a number or a dict of numbers"]
    return found or named, values, notes


def _ignore(path: Path) -> list[str]:
    """Add kmrun's files to a .gitignore (made if missing), each line once."""
    have = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    missing = [line for line in GITIGNORE if line not in have and line.rstrip("/") not in have]
    if missing:
        text = "\n".join(have) + ("\n" if have and have[-1] else "") + "# kmrun\n" + "\n".join(missing) + "\n"
        path.write_text(text.lstrip("\n"), encoding="utf-8")
    return missing


def search_space(params: dict[str, Any], prefix: str = "params", limit: int = 4) -> list[tuple[str, str]]:
    """Up to ``limit`` numeric parameters with a range around each value that respects its
    type and bounds (a fraction stays inside (0, 1)); seeds, worker counts and the like
    are left alone."""
    found: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            found += search_space(value, name, limit - len(found))
        elif NOT_SEARCHED.search(str(key)) or isinstance(value, bool):
            continue
        elif isinstance(value, float) and 0 < value <= 0.01:  # a rate or a penalty: orders of magnitude
            found.append((name, f"tag(log, interval({value / 10:g}, {value * 10:g}))"))
        elif isinstance(value, float) and 0 < value < 1:
            found.append((name, f"interval({value / 2:g}, {(1 + value) / 2:g})"))
        elif isinstance(value, float) and value >= 1:
            found.append((name, f"tag(log, interval({value / 10:g}, {value * 10:g}))"))
        elif isinstance(value, int) and value > 1:
            found.append((name, f"int(interval({max(1, value // 2)}, {value * 2}))"))
        if len(found) >= limit:
            break
    return found[:limit]
