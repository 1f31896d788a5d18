"""A sweep's results, from its records: the table (CSV and Markdown), the best job, the
plots, and what the parent MLflow run keeps of them. Reads ``records`` only."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .redact import REDACTED

if TYPE_CHECKING:
    from .records import StudySummary, SweepOutcome
    from .redact import Redactor
    from .tracking import Tracker

log = logging.getLogger(__name__)


STATE_NAMES = {"FAIL": "failed"}  # Optuna's trial states, as the parent's trials_* metrics name them


def table(outcome: SweepOutcome) -> list[dict[str, Any]]:
    """One row per job, best first."""
    metric, _ = outcome.objective.primary
    metric_names = sorted({m for o in outcome.outcomes for m in o.metrics})
    keys = list(dict.fromkeys(key for o in outcome.outcomes for key in o.values))  # a family's keys: some trials
    rows = []
    for job in outcome.ranked():
        row: dict[str, Any] = {"cell": job.index, **{k: job.values.get(k) for k in keys}, "status": str(job.status)}
        row[f"objective ({metric})"] = job.score()
        row.update({m: job.metrics.get(m) for m in metric_names})
        row["run_id"] = job.run_id or ""
        rows.append(row)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in the order they first appear: trials of a conditional
    space have different params (a missing one is an empty cell)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    head = columns(rows)
    lines = ["| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(_fmt(row.get(h))) for h in head) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A Markdown table cell: a ``|`` escaped, line breaks as ``<br>``."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def plot(outcome: SweepOutcome) -> Any:
    """A matplotlib figure: the objective against each swept key, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, _ = outcome.objective.primary
    jobs = outcome.outcomes
    keys = list(jobs[0].values) if jobs else []
    scored = [o for o in jobs if o.score() is not None]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        values = [o.values[key] for o in scored]
        numeric = all(_is_number(v) for v in values)
        xs: list[Any] = [float(v) for v in values] if numeric else values
        ax.scatter(xs, [o.score() for o in scored], alpha=0.8)
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(str(metric))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} by swept value ({len(scored)} of {len(jobs)} cells scored)")
    fig.tight_layout()
    return fig


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def log_parent(tracker: Tracker, parent: str, outcome: SweepOutcome, redact: Redactor) -> None:
    """Counts, the best job and the results tables on the parent run (``log_plots`` follows)."""
    metric, _ = outcome.objective.primary
    metrics: dict[str, float] = {k: float(v) for k, v in outcome.counts.items()}
    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    study = outcome.study
    top = outcome.best()
    if study is not None:
        for state, n in study.states.items():
            metrics[f"trials_{STATE_NAMES.get(state, state.lower())}"] = float(n)
        metrics["trials_this_run"] = float(len(outcome.outcomes))
        if study.infeasible is not None:  # over the whole study, as the best is
            metrics["trials_infeasible"] = float(study.infeasible)
        if study.warm_started is not None:
            metrics["trials_warm_started"] = float(study.warm_started)
        if len(outcome.objective.metrics) > 1:
            tags = {"optuna.pareto_trials": ",".join(str(t.number) for t in study.best)}
        elif study.best and metric:
            best = study.best[0]
            metrics[f"best_{metric}"] = float(best.values[0])
            params = redact.params({f"best.{k}": v for k, v in best.params.items()})
            tags = {"kmrun.best_run_id": best.run_id, "optuna.best_trial": str(best.number)}
    elif top is not None and metric:
        metrics[f"best_{metric}"] = top.score()  # type: ignore[assignment]
        params = redact.params({f"best.{k}": v for k, v in top.values.items()})
        tags = {"kmrun.best_run_id": top.run_id or "", "kmrun.best_cell": redact.text(top.label)}
    _log_once(tracker, parent, params)
    tracker.log(parent, metrics=metrics, tags=tags)
    rows = table(outcome)
    tracker.log_text(parent, redact.text(to_csv(rows)), "results.csv")
    tracker.log_text(parent, redact.text(to_markdown(rows)), "results.md")
    if study is not None:
        tracker.log_text(parent, redact.text(study.trials_csv), "trials.csv")
        if study.best_experiment is not None:
            tracker.log_text(parent, study.best_experiment, "best_experiment.yaml")


def log_plots(tracker: Tracker, parent: str, outcome: SweepOutcome) -> None:
    """The sweep's plots on the parent run: drawn last, after every record is stored."""
    study = outcome.study
    try:
        if study is None:
            log_grid_plot(tracker, parent, outcome)
        elif study.states.get("COMPLETE"):
            log_study_plots(tracker, parent, study, outcome.objective.metrics)
    except OSError as err:  # a full disk, say: the tables are stored; the plots are not essential
        log.warning("The sweep's plots could not be stored (%s); its results tables are.", err)


def log_grid_plot(tracker: Tracker, parent: str, outcome: SweepOutcome) -> None:
    import matplotlib.pyplot as plt

    figure = plot(outcome)
    try:
        tracker.client.log_figure(parent, figure, "objective_by_param.png", save_kwargs=TIGHT)
    finally:
        plt.close(figure)


def _log_once(tracker: Tracker, run_id: str, params: dict[str, str]) -> None:
    """MLflow params cannot change: the first best stays in the ``best.*`` params, and the
    current best is always the whole set of ``kmrun.best.*`` tags (rewritten, and those of
    an earlier best that the current one lacks removed)."""
    run = tracker.client.get_run(run_id)
    tracker.log(run_id, params={k: v for k, v in params.items() if k not in run.data.params},
                tags={f"kmrun.{k}": v for k, v in params.items()})
    for stale in [t for t in run.data.tags if t.startswith("kmrun.best.") and t[len("kmrun."):] not in params]:
        tracker.client.delete_tag(run_id, stale)


def experiment_file(redact: Redactor, config: dict[str, Any], about: str, run_name: str,
                    groups: Mapping[str, str] | None = None) -> str:
    """An experiment file (``# @package _global_``) holding a composed config's Kedro
    section and params, and the option of each config group in ``groups`` (``override
    /model: random_forest``), so that ``kmrun +experiment=<it>`` runs the same job again.
    Secrets are left out, so the project's own values apply."""
    from omegaconf import OmegaConf

    params = without_redacted(redact.tree(config.get("params", {})))
    body: dict[str, Any] = {"kedro": config.get("kedro", {}), "params": params,
                            "objective": config.get("objective", {}), "mlflow": {"run_name": run_name}}
    if groups:
        body = {"defaults": [*({f"override /{g}": o} for g, o in sorted(groups.items())), "_self_"], **body}
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


TIGHT = {"bbox_inches": "tight", "dpi": 120}  # no label cut at the figure's edge
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice", "intermediate_values")


def log_study_plots(tracker: Tracker, parent: str, study: StudySummary, names: list[str]) -> None:
    """Optuna's plots of the study (opened again from its storage): one self-contained
    HTML page (plotly), and a PNG each (matplotlib)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_png

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "set up pruning to plot ..." is not news
    optuna_study = optuna.load_study(study_name=study.name, storage=study.storage_url)
    multi = len(names) > 1
    wanted: tuple[str, ...] = ("pareto_front",) + PLOTS[2:4] if multi else PLOTS
    if not any(t.intermediate_values for t in optuna_study.get_trials(deepcopy=False)):
        wanted = tuple(name for name in wanted if name != "intermediate_values")  # nothing reported: no plot
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
                tracker.client.log_figure(parent, fig, f"plots/{name}.png", save_kwargs=TIGHT)
                plt.close(fig)
            except Exception as err:  # matplotlib's variant lags plotly's; the HTML page has the plot
                log.warning("No PNG of the %s plot (%s); it is in plots/study.html.", name, err)
    if sections:
        head = "<html><head><meta charset='utf-8'><title>study</title></head><body>"
        page = head + "".join(sections) + "</body></html>"
        tracker.log_text(parent, page, "plots/study.html")


