"""``kmrun init``: add kmrun's config to an existing Kedro project, touching none of Kedro's files."""

from __future__ import annotations

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
# An example Optuna study. Uncomment, adapt the search space, then:
#   kmrun -m +experiment=baseline +study=example
#
# study:
#   n_trials: 20
#   sampler: {{name: tpe, seed: 42}}
#   pruner: {{name: median}}      # nodes report with: from runner import report; report(value, step)
#   search_space:
#     {key}: {expression}
# objective:
#   metric: {metric}
#   direction: maximize
"""


def init(root: Path) -> list[Path]:
    """Write conf/kmrun.yaml, conf/experiment/baseline.yaml and conf/study/example.yaml."""
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
    metrics = _metric_datasets(project)
    metric = "null"  # kmrun cannot know which of the project's metrics matters
    note = ("; set it to a metric your `metrics` datasets hold" if metrics
            else "; add the dataset holding it to `metrics` and name it here")
    key, expression = _example_space(params)
    texts = [
        KMRUN_YAML.format(package=package, metric=metric, metric_note=note, metrics=f"[{', '.join(metrics)}]"),
        "# @package _global_\n# The baseline: the project's own parameters, to edit.\n#   kmrun +experiment=baseline\n"
        + OmegaConf.to_yaml(OmegaConf.create({"mlflow": {"run_name": "baseline"}, "params": params})),
        STUDY_YAML.format(key=key, expression=expression, metric="CHANGE_ME"),
    ]
    for target, text in zip(targets, texts, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return targets


def _metric_datasets(project: Any) -> list[str]:
    try:
        catalog = project.session.load_context().config_loader["catalog"]
    except Exception:
        return []
    return sorted(name for name in catalog if "metric" in name.lower() and not name.startswith("_"))


def _example_space(params: dict[str, Any], prefix: str = "params") -> tuple[str, str]:
    for key, value in params.items():
        if isinstance(value, dict):
            found = _example_space(value, f"{prefix}.{key}")
            if found[0] != "params.SOME_FLOAT":
                return found
        elif isinstance(value, float) and value > 0:
            return f"{prefix}.{key}", f"tag(log, interval({value / 10:g}, {value * 10:g}))"
        elif isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return f"{prefix}.{key}", f"int(interval({max(1, value // 2)}, {value * 2}))"
    return "params.SOME_FLOAT", "interval(0.1, 1.0)"
