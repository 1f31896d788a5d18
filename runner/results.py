"""A sweep's results: the table (CSV and Markdown), the best cell, a plot, and what the
parent MLflow run keeps of them."""

from __future__ import annotations

import csv
import io
import logging
import math
from typing import TYPE_CHECKING, Any

from .tracking import REDACTED

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .schema import KmrunConf
    from .tracking import Redactor
    from .study import Study
    from .sweep import Cell
    from .tracking import Tracker

DONE = ("FINISHED", "SKIPPED")


def swept(cell: Cell) -> dict[str, str]:
    """``{"params.model.C": "0.1", ...}`` for one cell."""
    return dict(o.lstrip("+").split("=", 1) for o in cell.swept)  # type: ignore[misc]


def primary(conf: KmrunConf) -> tuple[str | None, str]:
    """The metric and direction a grid sorts by (the first, for several)."""
    metric, direction = conf.objective.metric, conf.objective.direction
    if isinstance(metric, list):
        return metric[0], direction[0]
    return metric, direction


def score(cell: Cell) -> float | None:
    value = cell.objective[0] if isinstance(cell.objective, list) else cell.objective
    if cell.status in DONE and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def ranked(conf: KmrunConf, cells: list[Cell]) -> list[Cell]:
    """Cells by objective, best first; cells without one last, in grid order."""
    _, direction = primary(conf)
    sign = -1.0 if direction == "maximize" else 1.0
    return sorted(cells, key=lambda c: (score(c) is None, sign * (score(c) or 0.0), c.index))


def best(conf: KmrunConf, cells: list[Cell]) -> Cell | None:
    top = ranked(conf, cells)
    return top[0] if top and score(top[0]) is not None else None


def table(conf: KmrunConf, cells: list[Cell]) -> list[dict[str, Any]]:
    metric, _ = primary(conf)
    metric_names = sorted({m for c in cells for m in c.metrics})
    rows = []
    for cell in ranked(conf, cells):
        row: dict[str, Any] = {"cell": cell.index, **swept(cell), "status": cell.status}
        row[f"objective ({metric})"] = score(cell)
        row.update({m: cell.metrics.get(m) for m in metric_names})
        row["run_id"] = cell.run_id or ""
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[h]) for h in head) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def plot(conf: KmrunConf, cells: list[Cell]) -> Any:
    """A matplotlib figure: the objective against each swept key, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = primary(conf)
    keys = list(swept(cells[0])) if cells else []
    scored = [c for c in cells if score(c) is not None]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [swept(c)[key] for c in scored]
        numeric = all(_is_number(v) for v in values)
        xs: list[Any] = [float(v) for v in values] if numeric else values
        ax.scatter(xs, [score(c) for c in scored], alpha=0.8)
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(str(metric))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept value ({len(scored)} of {len(cells)} cells scored)")
    fig.tight_layout()
    return fig


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def counts(cells: list[Cell]) -> dict[str, int]:
    status = [c.status for c in cells]
    return {
        "jobs_total": len(cells),
        "jobs_finished": status.count("FINISHED") + status.count("SKIPPED"),
        "jobs_failed": status.count("FAILED"),
        "jobs_skipped": status.count("SKIPPED"),
        "jobs_killed": status.count("KILLED"),
        "jobs_not_started": status.count("NOT_STARTED"),
    }


def log_parent(
    tracker: Tracker, parent: str, conf: KmrunConf, cells: list[Cell], redact: Redactor, with_plot: bool = True
) -> None:
    """Counts, the best cell, the results table and the plot, on the parent run."""
    metric, _ = primary(conf)
    metrics: dict[str, float] = {k: float(v) for k, v in counts(cells).items()}
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    top = best(conf, cells)
    if top is not None and metric:
        metrics[f"best_{metric}"] = score(top)  # type: ignore[assignment]
        params = redact.params({f"best.{k}": v for k, v in swept(top).items()})
        tags = {"kmrun.best_run_id": top.run_id or "", "kmrun.best_cell": redact.text(top.label)}
    _log_once(tracker, parent, params)
    tracker.log(parent, metrics=metrics, tags=tags)
    rows = table(conf, cells)
    tracker.log_text(parent, redact.text(to_csv(rows)), "results.csv")
    tracker.log_text(parent, redact.text(to_markdown(rows)), "results.md")
    if not with_plot:
        return
    figure = plot(conf, cells)
    tracker.client.log_figure(parent, figure, "objective_by_param.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def _log_once(tracker: Tracker, run_id: str, params: dict[str, str]) -> None:
    """MLflow params cannot change; a resumed sweep whose best moved keeps it in tags."""
    existing = tracker.client.get_run(run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in existing}
    changed = {f"kmrun.{k}": v for k, v in params.items() if k in existing and existing[k] != v}
    tracker.log(run_id, params=fresh, tags=changed)


def log_study(study: Study, parent: str, with_plots: bool = True) -> None:
    """The best trial (or Pareto set), the trials table, Optuna's plots and a ready
    experiment file of the best params, on the study's parent run."""
    from optuna.trial import TrialState

    tracker, optuna_study = study.tracker, study.study
    metric = study.conf.objective.metric
    names = metric if isinstance(metric, list) else [metric]
    trials = optuna_study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    metrics = {
        "trials_complete": float(states.count(TrialState.COMPLETE)),
        "trials_pruned": float(states.count(TrialState.PRUNED)),
        "trials_failed": float(states.count(TrialState.FAIL)),
        "trials_this_run": float(len(study.cells)),
    }
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    if TrialState.COMPLETE in states:
        if len(names) == 1:
            best_trial = optuna_study.best_trial
            metrics[f"best_{names[0]}"] = float(best_trial.value)  # type: ignore[arg-type]
            params = study.redact.params({f"best.{k}": v for k, v in best_trial.params.items()})
            tags = {"kmrun.best_run_id": str(best_trial.user_attrs.get("mlflow_run_id", "")),
                    "optuna.best_trial": str(best_trial.number)}
            experiment = best_experiment(study, best_trial)
            tracker.log_text(parent, experiment, "best_experiment.yaml")
            if study.settings.export_best:
                target = study.conf_dir / "experiment" / f"{study.settings.export_best}.yaml"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(experiment, encoding="utf-8")
        else:
            pareto = optuna_study.best_trials
            tags = {"optuna.pareto_trials": ",".join(str(t.number) for t in pareto)}
    _log_once(tracker, parent, params)
    tracker.log(parent, metrics=metrics, tags=tags)
    frame = optuna_study.trials_dataframe()
    tracker.log_text(parent, study.redact.text(frame.to_csv(index=False)), "trials.csv")
    if with_plots and TrialState.COMPLETE in states:
        log_study_plots(tracker, parent, optuna_study, names)


def best_experiment(study: Study, trial: Any) -> str:
    """A ``conf/experiment`` file that reruns the trial: ``+experiment=<its name>``."""
    spec = study.compose(trial.params, open_store=False)
    return experiment_file(
        study.redact,
        spec.config,
        f"Best trial {trial.number} of Optuna study '{study.name}': "
        f"{study.conf.objective.metric} = {trial.value:.6g}.",
        f"best of {study.name} (trial {trial.number})",
    )


def experiment_file(redact: Redactor, config: dict[str, Any], about: str, run_name: str) -> str:
    """An experiment file (``# @package _global_``) holding a composed config's Kedro
    section and params, so that ``kmrun +experiment=<it>`` runs the same job again.
    Secrets are left out, so the project's own values apply."""
    from omegaconf import OmegaConf

    params = without_redacted(redact.tree(config.get("params", {})))
    body = {"kedro": config.get("kedro", {}), "params": params,
            "objective": config.get("objective", {}), "mlflow": {"run_name": run_name}}
    header = (
        "# @package _global_\n"
        f"# {about}\n"
        "# Written by kmrun. Rerun it with: kmrun +experiment=<this file's name>\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def without_redacted(tree: dict[str, Any]) -> dict[str, Any]:
    """A nested dict minus the leaves that were logged as ``***``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = without_redacted(value)
        elif value != REDACTED:
            out[key] = value
    return out


PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice", "intermediate_values")


def log_study_plots(tracker: Tracker, parent: str, optuna_study: Any, names: list[str]) -> None:
    """Optuna's plots: one self-contained HTML page (plotly), and a PNG each (matplotlib)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_png

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "set up pruning to plot ..." is not news
    multi = len(names) > 1
    wanted = ("pareto_front",) + PLOTS[2:4] if multi else PLOTS
    target = {"target": lambda t: t.values[0], "target_name": names[0]} if multi else {}
    sections, first = [], True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings from optuna.visualization
        for name in wanted:
            kwargs = {"target_names": names} if name == "pareto_front" else (
                {} if name == "intermediate_values" else target)
            try:
                figure = getattr(vis, f"plot_{name}")(optuna_study, **kwargs)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances need two complete trials; no steps reported
            sections.append(f"<h2>{name.replace('_', ' ')}</h2>" +
                            figure.to_html(full_html=False, include_plotlyjs=first))
            first = False
            try:
                axes = getattr(vis_png, f"plot_{name}")(optuna_study, **kwargs)
                fig = axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure
                tracker.client.log_figure(parent, fig, f"plots/{name}.png")
                plt.close(fig)
            except Exception as err:  # matplotlib's variant lags plotly's; the HTML page has the plot
                log.warning("No PNG of the %s plot (%s); it is in plots/study.html.", name, err)
    if sections:
        page = "<html><head><meta charset='utf-8'><title>study</title></head><body>" + "".join(sections) + "</body></html>"
        tracker.log_text(parent, page, "plots/study.html")
