"""MLflow Models from a job's datasets, and the Model Registry.

A job whose config sets ``model.dataset`` saves the trained model it produced as an MLflow
Model (the flavor of its library, or pyfunc); with ``model.pipeline`` it packages a Kedro
inference pipeline with the trained datasets that pipeline reads, as one pyfunc model
(``pyfunc_model.py`` is its code). The model is saved to a folder first, its text files
are redacted like everything kmrun logs, and then it is uploaded as the run's ``model``
artifact: at once (a single run, ``model.runs: all``), or only for the sweep's best job
(``model.runs: best``; the others' folders are dropped as the sweep goes).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, KmrunError, ModelError, ProjectError

if TYPE_CHECKING:
    from .kedro_bridge import KedroProject
    from .records import Outcome
    from .redact import Redactor
    from .schema import KmrunConf, ModelConf
    from .tracking import Tracker

log = logging.getLogger(__name__)

MODEL_PATH = "model"  # the artifact path of a run's model: runs:/<run_id>/model
MODEL_TAG = "kmrun.model"  # the logged model's flavor, on the run that holds it
FLAVORS = {  # a model's top-level module -> MLflow's flavor for it
    "sklearn": "sklearn", "xgboost": "xgboost", "lightgbm": "lightgbm", "catboost": "catboost",
    "torch": "pytorch", "keras": "keras", "tensorflow": "tensorflow", "statsmodels": "statsmodels",
    "prophet": "prophet", "spacy": "spacy", "transformers": "transformers",
}
LIBRARIES = {flavor: module for module, flavor in FLAVORS.items()}
TEXT_FILES = {".json", ".yaml", ".yml", ".txt", ".py", ""}  # MLmodel has no suffix


def wanted(conf: KmrunConf) -> bool:
    return bool(conf.model.dataset or conf.model.pipeline) and conf.model.runs != "none"


def captured(conf: KmrunConf, project: KedroProject) -> set[str]:
    """The datasets a job keeps in memory for its model."""
    if not wanted(conf):
        return set()
    model = conf.model
    names = {name for name in (model.dataset, model.input_example) if name}
    return names | (trained_inputs(project, model) if model.pipeline else set())


def trained_inputs(project: KedroProject, model: ModelConf) -> set[str]:
    """What the inference pipeline reads besides the caller's input and params."""
    assert model.pipeline is not None
    return {name for name in _inference(project, model.pipeline).inputs()
            if name != model.pipeline_input and not _is_param(name)}


def check(conf: KmrunConf, project: KedroProject) -> None:
    """Before anything runs: the datasets and the flavor the model section names exist."""
    if not wanted(conf):
        return
    model = conf.model
    produced = set(project.pipeline(conf.kedro.pipeline, conf.kedro.tags).all_outputs())
    where = f"pipeline '{conf.kedro.pipeline}'"
    if model.dataset and model.dataset not in produced:
        raise ConfigError(f"model.dataset '{model.dataset}' is not a dataset {where} produces."
                          f"{_near(model.dataset, produced)}\nIt produces: {', '.join(sorted(produced))}.")
    if model.flavor not in ("auto", "pyfunc"):
        if importlib.util.find_spec(f"mlflow.{model.flavor}") is None:
            raise ConfigError(f"model.flavor '{model.flavor}' is not an MLflow flavor. Use auto, pyfunc, or one of: "
                              f"{', '.join(sorted(LIBRARIES))}.")
        library = LIBRARIES.get(model.flavor, model.flavor)
        if importlib.util.find_spec(library) is None:
            raise ConfigError(f"model.flavor '{model.flavor}' needs the {library} package, which is not installed "
                              f"here: pip install {library}")
    known = produced | set(project.catalog())
    if model.input_example and model.input_example not in known and model.input_example not in project.catalog():
        raise ConfigError(f"model.input_example '{model.input_example}' is neither produced by {where} nor in the "
                          f"catalog.{_near(model.input_example, known)}")
    if model.pipeline:
        inference = _inference(project, model.pipeline)
        if model.pipeline_input not in inference.inputs():
            raise ConfigError(f"model.pipeline_input '{model.pipeline_input}' is not an input of pipeline "
                              f"'{model.pipeline}'. Its inputs: {', '.join(sorted(inference.inputs()))}.")
        missing = trained_inputs(project, model) - produced
        if missing:
            raise ConfigError(f"model.pipeline '{model.pipeline}' reads {', '.join(sorted(missing))}, which {where} "
                              "does not produce. The model carries only what the training run made.")
        if len(inference.outputs()) != 1:
            raise ConfigError(f"model.pipeline '{model.pipeline}' has {len(inference.outputs())} free outputs "
                              f"({', '.join(sorted(inference.outputs()))}); a model returns one.")


def warm(conf: KmrunConf) -> list[str]:
    """Before a sweep forks its workers: import what the first ``save`` imports (MLflow's
    pyfunc and model signature code, the flavor of each library the project has imported),
    so that each worker inherits it instead of paying seconds for it. Returns the flavors."""
    if not wanted(conf):
        return []
    import mlflow.models.signature
    import mlflow.pyfunc  # noqa: F401

    flavors = [conf.model.flavor] if conf.model.flavor not in ("auto", "pyfunc") else [
        flavor for module, flavor in FLAVORS.items() if module in sys.modules]
    warmed = []
    for flavor in flavors:
        try:
            importlib.import_module(f"mlflow.{flavor}")
            warmed.append(flavor)
        except ImportError:
            continue
    return warmed


def save(conf: KmrunConf, project: KedroProject, params: Mapping[str, Any], datasets: Mapping[str, Any],
         redact: Redactor, folder: Path) -> str:
    """Save the job's model into ``folder`` (made here); return its flavor."""
    model = conf.model
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    wanted = {model.dataset} if model.dataset else trained_inputs(project, model)
    missing = sorted(name for name in wanted if name not in datasets)
    if missing:
        raise ModelError(f"The model needs {', '.join(missing)}, which this run did not produce (were its nodes "
                         "left out by kedro.tags?).")
    example = _example(model, datasets, project)
    with no_progress_bars(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if model.pipeline:
            flavor = "pyfunc"
            _save_pipeline(model, project, params, datasets, redact, folder, example)
        else:
            value = datasets[model.dataset]  # type: ignore[index]
            library = type(value).__module__.split(".")[0]
            flavor = model.flavor if model.flavor != "auto" else FLAVORS.get(library, "pyfunc")
            if flavor == "pyfunc":
                _save_object(value, model, project, folder, example)
            else:
                module = importlib.import_module(f"mlflow.{flavor}")
                defaults = getattr(module, "get_default_pip_requirements", None)
                module.save_model(value, str(folder), input_example=example,
                                  pip_requirements=defaults() if defaults else None,
                                  **_trusted_types(module, value))
    for warning in caught:
        log.debug("While saving the model: %s", warning.message)
    _redact_files(folder, redact)
    return flavor


def _trusted_types(module: Any, value: Any) -> dict[str, Any]:
    """MLflow saves scikit-learn models with skops, which refuses types it does not trust
    (a random forest's trees). kmrun saves the model its own run just trained: its types
    are trusted (and recorded in the MLmodel file, for loading)."""
    import inspect

    if "skops_trusted_types" not in inspect.signature(module.save_model).parameters:
        return {}
    try:
        import skops.io
    except ImportError:
        return {}
    return {"skops_trusted_types": skops.io.get_untrusted_types(data=skops.io.dumps(value)) or None}


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar (on stderr, even without a terminal) while it copies
    artifacts, and has no other switch than this variable: it is set for the copy only."""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def publish_model(tracker: Tracker, run_id: str, folder: Path, flavor: str) -> None:
    """Upload a saved model as the run's ``model`` artifact, and drop the folder."""
    with no_progress_bars():
        tracker.client.log_artifacts(run_id, str(folder), MODEL_PATH)
    tracker.client.set_tag(run_id, MODEL_TAG, flavor)
    shutil.rmtree(folder, ignore_errors=True)


def staging(sweep_dir: Path) -> Path:
    """Where the jobs of a sweep with ``model.runs: best`` save their models until it ends."""
    return sweep_dir / ".kmrun-models"


class BestModel:
    """The best job of a sweep, as results come in. With ``model.runs: best`` every job
    saves its model into its own folder here; only the best one's is kept, and uploaded
    when the sweep ends. Then the best job's model is registered under ``register``, if
    given (with ``model.runs: all`` it was uploaded by its job)."""

    def __init__(self, folder: Path, direction: str, register: str | None = None) -> None:
        self.folder, self.sign, self.register = folder, (1 if direction == "maximize" else -1), register
        self.best: Outcome | None = None

    def offer(self, outcome: Outcome) -> None:
        if outcome.run_id is None:
            return
        score = outcome.score()
        if score is not None and (self.best is None or self.sign * score > self.sign * (self.best.score() or 0.0)):
            loser, self.best = self.best, outcome
        else:
            loser = outcome
        if loser is not None and loser.run_id:
            shutil.rmtree(self.folder / loser.run_id, ignore_errors=True)

    def finish(self, tracker: Tracker, publish: bool, note: Any) -> None:
        """Upload the best job's saved model (unless the sweep was interrupted), register it,
        and drop the folder. A failure here is said, and does not undo the sweep's results."""
        try:
            best = self.best.run_id if self.best is not None else None
            saved = self.folder / best if best else None
            if publish and best and saved is not None and saved.exists():
                flavor = (saved / "flavor").read_text()
                publish_model(tracker, best, saved / MODEL_PATH, flavor)
                note(f"The best run's model: runs:/{best}/{MODEL_PATH} ({flavor}).")
            if publish and self.register:
                if best is None:
                    note(f"No job finished with a model, so nothing was registered as {self.register}.")
                else:
                    version = register(tracker, best, self.register)
                    note(f"Registered as {self.register} version {version}: kmrun serve {self.register}/{version}")
        except Exception as err:
            log.error("The best run's model could not be stored or registered: %s", err)
            note(f"The best run's model could not be stored or registered: {err}")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def register(tracker: Tracker, run_id: str, name: str, alias: str | None = None) -> str:
    """Register the run's model under ``name``; return the new version."""
    client = tracker.client
    run = client.get_run(run_id)
    if MODEL_TAG not in run.data.tags:
        raise KmrunError(f"Run {run_id} has no model. Set model.dataset (or model.pipeline) in the config, "
                         "run it again, then register that run.")
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise KmrunError(f"Cannot register a model named {name!r}: {err}") from None
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_PATH}", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


# --- the parts --------------------------------------------------------------------------


def _inference(project: KedroProject, name: str) -> Any:
    try:
        return project.pipeline(name, [])
    except ProjectError as err:
        raise ConfigError(str(err).replace("kedro.pipeline:", "model.pipeline:", 1)) from None


def _is_param(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def _near(name: str, names: Any) -> str:
    close = get_close_matches(name, sorted(names), n=2)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def _example(model: ModelConf, datasets: Mapping[str, Any], project: KedroProject) -> Any:
    if not model.input_example:
        return None
    value = datasets[model.input_example] if model.input_example in datasets else project.load(model.input_example)
    rows = model.example_rows
    if hasattr(value, "head"):  # pandas
        return value.head(rows)
    if hasattr(value, "shape") or isinstance(value, (list, tuple)):  # numpy, lists
        return value[:rows]
    return value


def _save_object(value: Any, model: ModelConf, project: KedroProject, folder: Path, example: Any) -> None:
    if not callable(getattr(value, "predict", None)):
        raise ModelError(f"model.dataset '{model.dataset}' holds a {type(value).__name__}, which has no predict "
                         "method; set model.flavor to its MLflow flavor.")
    _pyfunc(folder, {"kind": "object"}, {"object": value}, project, example, [value])


def _save_pipeline(model: ModelConf, project: KedroProject, params: Mapping[str, Any], datasets: Mapping[str, Any],
                   redact: Redactor, folder: Path, example: Any) -> None:
    assert model.pipeline is not None
    inference = _inference(project, model.pipeline)
    reads = {name: _param(name, params) for name in inference.inputs() if _is_param(name)}
    if redact.tree(reads) != reads:
        raise ModelError(f"model.pipeline '{model.pipeline}' reads a secret parameter; kmrun does not store "
                         "secrets in a model. Pass it to the served model another way.")
    trained = {name: datasets[name] for name in sorted(trained_inputs(project, model))}
    config = {"kind": "pipeline", "package": project.package_name, "pipeline": model.pipeline,
              "input": model.pipeline_input, "output": next(iter(inference.outputs())), "params": reads}
    _pyfunc(folder, config, trained, project, example, list(trained.values()))


def _pyfunc(folder: Path, config: dict[str, Any], data: Mapping[str, Any], project: KedroProject, example: Any,
            objects: list[Any]) -> None:
    import mlflow.pyfunc

    staged = folder.parent / f"{folder.name}.data"
    staged.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for name, value in data.items():
        path = staged / f"{name}.pkl"
        path.write_bytes(pickle.dumps(value))
        artifacts[name] = str(path)
    try:
        mlflow.pyfunc.save_model(
            str(folder), python_model=str(Path(__file__).with_name("pyfunc_model.py")), artifacts=artifacts,
            model_config=config, code_paths=[str(_package_dir(project))], input_example=example,
            pip_requirements=_requirements(objects))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _package_dir(project: KedroProject) -> Path:
    spec = importlib.util.find_spec(project.package_name)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    return project.root / "src" / project.package_name


def _requirements(objects: list[Any]) -> list[str]:
    """Pinned: Kedro, pandas, numpy and the libraries of the trained objects."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    modules = {"kedro", "pandas", "numpy", "cloudpickle"} | {type(o).__module__.split(".")[0] for o in objects}
    names = packages_distributions()
    found = []
    for module in sorted(modules):
        for dist in names.get(module, [module]):
            try:
                found.append(f"{dist}=={version(dist)}")
            except PackageNotFoundError:
                continue
    return sorted(set(found))


def _param(name: str, params: Mapping[str, Any]) -> Any:
    if name == "parameters":
        return dict(params)
    value: Any = params
    for part in name.removeprefix("params:").split("."):
        value = value[part]
    return value


def _redact_files(folder: Path, redact: Redactor) -> None:
    """Secrets out of the model's text files, which stay valid YAML and JSON."""
    import json

    import yaml

    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix not in TEXT_FILES or "code" in path.relative_to(folder).parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if redact.text(text) == text:
            continue
        if path.suffix == ".json":
            path.write_text(json.dumps(redact.tree(json.loads(text))), encoding="utf-8")
        elif path.suffix in (".yaml", ".yml", ""):
            path.write_text(yaml.safe_dump(redact.tree(yaml.safe_load(text)), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(redact.text(text), encoding="utf-8")
