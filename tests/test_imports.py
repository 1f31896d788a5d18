"""The module graph points one way, and the private APIs kmrun still uses exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "runner"
TOP = {"cli", "api", "commands", "registry", "scaffold"}  # entry points: nothing below may import them
REPORT_READS = {"records", "tracking", "redact", "errors", "results"}  # what the report layer may import


def imports() -> dict[str, set[str]]:
    """Every runner module's imports of other runner modules, lazy ones included."""
    graph = {}
    for path in RUNNER.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names if (RUNNER / f"{a.name}.py").exists())
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_import_cycle():
    graph = imports()
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, " -> ".join((*trail, module))
        if module in done:
            return
        for child in graph.get(module, ()):
            visit(child, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_nothing_below_the_entry_points_imports_them():
    graph = imports()
    for module, deps in graph.items():
        if module not in TOP and module != "__init__":
            assert not deps & TOP, (module, deps & TOP)


def test_the_report_layer_reads_records_only():
    graph = imports()
    for module in ("results", "terminal"):
        assert graph[module] <= REPORT_READS | {"__init__"}, (module, graph[module] - REPORT_READS)


def test_the_engine_knows_neither_grids_nor_optuna():
    source = (RUNNER / "engine.py").read_text()
    assert imports()["engine"] <= {"errors", "records", "job", "scheduler", "tracking"}
    assert "optuna" not in source and "grid" not in imports()["engine"]


def test_private_apis_kmrun_relies_on_still_exist():
    """Each is used for lack of a public way; this fails loudly when a release drops one."""
    import optuna
    from hydra.core.global_hydra import GlobalHydra
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from runner.runtime import engine_map

    assert isinstance(engine_map(SqlAlchemyStore), dict)  # runtime.mlflow_engines: dispose after fork
    from mlflow.tracking._tracking_service import utils

    assert callable(utils._use_tracking_uri)  # fluent.active_run: the job's store, for the pipeline only
    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(trial._trial_id, int)  # study: heartbeats and failing stale trials by id
    assert study.get_trials(deepcopy=False)[0]._trial_id == trial._trial_id  # board: taking a queued trial by id
    grid = optuna.samplers.GridSampler({"x": [1, 2, 3]})
    assert len(grid._all_grids) == 3  # study: a grid sampler caps the target
    from hydra import initialize_config_dir
    from hydra._internal.hydra import Hydra

    with initialize_config_dir(str(RUNNER.parent / "conf"), version_base="1.3"):
        assert isinstance(GlobalHydra.instance().hydra, Hydra) and callable(Hydra.show_info)  # cli: --info
    from mlflow.pyfunc import scoring_server

    assert isinstance(scoring_server._SERVER_MODEL_PATH, str)  # registry.serve: the model folder runner.serving loads
    from mlflow.utils.validation import _validate_model_alias_name

    from runner.errors import KmrunError
    from runner.registry import _check_alias

    assert callable(_validate_model_alias_name)  # registry: --alias, with the reserved names refused too
    for reserved in ("latest", "v3"):
        with pytest.raises(KmrunError):
            _check_alias(reserved)
    if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna 5: warm.py writes the key set_constraint writes
        from optuna.study import _constrained_optimization

        assert isinstance(_constrained_optimization._CONSTRAINTS_KEY, str)
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    assert callable(_get_pareto_front_trials_by_trials)  # study: the best trials of a multi-objective study
    from optuna.storages import RDBStorage

    assert callable(RDBStorage._get_stale_trial_ids)  # patience: failing stale trials waits out an outage too


def test_kedros_private_surfaces_kmrun_relies_on_still_exist(tmp_path):
    """kedro_bridge caches parsed config files by wrapping ``OmegaConfigLoader._read_raw_config``
    and hands its session that loader through ``KedroServiceSession._get_config_loader``
    (Kedro has no public hook for either): a Kedro release that renames them fails here,
    not for a user."""
    import inspect

    from kedro.config import OmegaConfigLoader
    from kedro.framework.session import KedroServiceSession

    (tmp_path / "base").mkdir()
    (tmp_path / "local").mkdir()
    (tmp_path / "base" / "parameters.yml").write_text("a: 1\n")
    loader = OmegaConfigLoader(str(tmp_path), base_env="base", default_run_env="local")
    assert getattr(loader, "_protocol", None) == "file"
    assert list(inspect.signature(KedroServiceSession._get_config_loader).parameters)[:2] == ["self", "runtime_params"]
    # a job served wholly by the node cache calls the project's pipeline hooks through the session's
    # hook manager, with a catalog made as a run makes it
    assert "self._hook_manager" in inspect.getsource(KedroServiceSession.run)
    from kedro.framework.context import KedroContext

    assert "save_version" in inspect.signature(KedroContext._get_catalog).parameters
    # kedro_bridge blocks kedro-mlflow's hooks before they are imported by wrapping this function,
    # which the session calls by its module-level name with the hook manager and the disabled plugins
    from kedro.framework.session import service_session

    assert list(inspect.signature(service_session._register_hooks_entry_points).parameters) == [
        "hook_manager", "disabled_plugins"]
    assert "_register_hooks_entry_points(hook_manager" in inspect.getsource(KedroServiceSession.__init__)
    import kedro

    if tuple(int(part) for part in kedro.__version__.split(".")[:2]) < (1, 7):  # before the method existed:
        from runner.kedro_config import ParsedConfig

        assert not hasattr(loader, "_read_raw_config") and ParsedConfig().attach(loader) is loader  # left alone
        assert loader["parameters"] == {"a": 1}
        return
    base, env, base_path, env_path, files = loader._read_raw_config("parameters")  # the shape kmrun caches
    assert isinstance(files, set) and str(base_path).endswith("base") and str(env_path).endswith("local")
    assert loader["parameters"] == {"a": 1}


def test_every_attribute_of_a_runner_object_is_made_in_its_init():
    """An object's shape is visible in ``__init__``: no attribute appears later, in whichever
    method happens to run first (the call order is then a state the object checks)."""
    late = []
    for path in sorted(RUNNER.glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            declared = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                for node in ast.walk(fn):
                    targets = node.targets if isinstance(node, ast.Assign) else (
                        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                    for target in (t for tt in targets for t in ast.walk(tt)):
                        if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self":
                            if fn.name == "__init__":
                                declared.add(target.attr)
                            else:
                                late.append((cls.name, fn.name, target.attr))
            late = [item for item in late if item[0] != cls.name or item[2] not in declared]
    # MLflow builds a PythonModel without arguments and calls load_context: that is its __init__
    assert {(c, a) for c, _, a in late} <= {("KmrunModel", "config"), ("KmrunModel", "data"),
                                            ("KmrunModel", "nodes")}, late
