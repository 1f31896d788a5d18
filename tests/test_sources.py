"""The grid and study sources in this process, on a copy of the example project: real
Hydra composition, real Kedro parameters, a real Optuna storage; no runs, no processes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from runner.compose import Composer
from runner.errors import ConfigError
from runner.grid import Grid, expand
from runner.records import JobResult, Status
from runner.schema import parse


class StoreStub:
    """What a source asks of the MLflow store (``tracking.RunStore``), answered from a list
    of finished runs."""

    def __init__(self, finished: dict[str, str] | None = None, taken: set[str] = frozenset(),
                 tags: dict[str, str] | None = None) -> None:
        self.finished = finished or {}  # config hash -> run id
        self.tags = tags or {}  # more tags of each finished run (its fingerprint)
        self.taken = set(taken)  # config hashes another process is running
        self.ended: list[tuple[str, str]] = []
        self.elsewhere = "RUNNING"  # how the other process's run stands when looked at again
        self.owner_lives = True
        self.client = SimpleNamespace(get_run=lambda run_id: self._run(run_id.removeprefix("elsewhere-"),
                                                                       self.elsewhere))

    @staticmethod
    def _run(config_hash, status):
        return SimpleNamespace(info=SimpleNamespace(run_id=f"elsewhere-{config_hash}", status=status),
                               data=SimpleNamespace(metrics={"accuracy": 0.7} if status == "FINISHED" else {}))

    def start(self, run_name, tags, parent_id=None):
        return f"run-{tags.get('kmrun.config_hash', '')[:4]}"

    def claim(self, config_hash, run_name, tags, parent_id, rerun=False, fingerprint=None):
        if config_hash in self.taken:
            return None, self._run(config_hash, "RUNNING")
        return f"run-{config_hash[:4]}", None

    def owner_alive(self, run) -> bool:
        return self.owner_lives

    def end_stale(self, run_id: str, with_parent: bool = False, trial_failed: bool = False) -> None:  # the dead owner's run ends FAILED: the cell is free again
        self.taken.discard(run_id.removeprefix("elsewhere-"))
        self.elsewhere = "FAILED"

    def release(self, run_id: str) -> None:
        return None

    def search(self, filter_string: str, max_results: int = 0) -> list:
        if "'child'" not in filter_string:
            return []
        return [SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(
            tags={"kmrun.config_hash": h, **self.tags}, metrics={"accuracy": 0.5}))
            for h, run_id in self.finished.items()]

    def fail_stale_runs(self) -> list[str]:
        return []

    def finish(self, run_id: str, status: str) -> None:
        self.ended.append((run_id, status))


def test_the_store_stub_implements_what_sources_ask_of_the_store():
    """It cannot drift from ``RunStore``: the same members, with the same parameters."""
    import inspect

    from runner.tracking import RunStore, Tracker

    members = [name for name in vars(RunStore) if not name.startswith("_")]
    assert "claim" in members and "client" in RunStore.__annotations__
    for name in members:
        wanted = list(inspect.signature(getattr(RunStore, name)).parameters)
        assert list(inspect.signature(getattr(StoreStub, name)).parameters) == wanted, name
        assert list(inspect.signature(getattr(Tracker, name)).parameters) == wanted, name
    assert hasattr(StoreStub(), "client")


@pytest.fixture
def composer(ws, monkeypatch):
    monkeypatch.chdir(ws.path)
    with Composer() as composer:
        yield composer


def grid_of(composer, args, yaml_grid=None):
    base, cells = expand(composer, args, yaml_grid or {})
    conf = parse(composer.compose(base))
    return Grid(composer, conf, base, cells)


def test_a_grid_expands_the_product_and_the_command_line_wins_over_yaml(composer):
    grid = grid_of(composer, ["+experiment=baseline", "params.model.C=0.1,1", "params.split.seed=range(0,2)"],
                   {"params.model.C": "5,6,7"})
    assert [c.swept for c in grid.outcomes] == [
        ["params.model.C=0.1", "params.split.seed=0"], ["params.model.C=0.1", "params.split.seed=1"],
        ["params.model.C=1", "params.split.seed=0"], ["params.model.C=1", "params.split.seed=1"]]
    grid.check(open_store=False)
    assert [grid.specs[i].params["model"]["C"] for i in range(4)] == [0.1, 0.1, 1.0, 1.0]
    assert isinstance(grid.specs[2].params["model"]["C"], float)  # coerced to the parameter's type
    assert len({spec.config_hash for spec in grid.specs.values()}) == 4


@pytest.mark.parametrize("args, shortcut", [
    (["+experiment=baseline", "params.model.C=0.1,1e-3,-2,7", "params.split.seed=range(0,3)"], True),
    (["+experiment=baseline", "params.model.C=3", "params.model={C:0.5,max_iter:50},{C:2}", "+params.extra=a,'b c'"],
     True),
    (["+experiment=baseline", "mlflow.run_name=one", "params.model.C=0.1,2", "params.model.type=sgd,random_forest"],
     True),
    (["+experiment=baseline", "mlflow.experiment_name=e", "mlflow.run_name='${.experiment_name}'", "params.model.C=0.1,2"],
     False),  # the config interpolates: each cell composed
])
def test_a_grid_checked_without_composing_each_cell_gives_the_specs_composing_gives(composer, args, shortcut):
    """Cells that set only params values skip composition (``JobComposer.params_only``) and
    Hydra's parser for numbers, unless the config interpolates: each spec equals the one
    composed and parsed in full."""
    from runner.job import prepare

    grid = grid_of(composer, args)
    grid.check(open_store=False)
    assert all((grid._compose.params_only(cell.swept) is not None) is shortcut for cell in grid.outcomes)
    for cell in grid.outcomes:
        overrides = grid.base + cell.swept
        cfg = composer.compose(overrides)
        full = prepare(cfg, overrides, grid._compose.choices, composer.config_dir, open_store=False)
        spec = grid.specs[cell.index]
        assert (spec.conf, spec.params, spec.config, spec.config_hash, spec.fingerprint, spec.redact.values) == (
            full.conf, full.params, full.config, full.config_hash, full.fingerprint, full.redact.values), cell.swept


@pytest.mark.parametrize("line", ["params.a=1", "params.a=-1", "params.a.b=0", "params.a=1.5", "params.a=-0.25",
                                  "params.a=1e-3", "params.a=2E+10", "params.a=1.5e3", "params.a=01", "params.a=1.",
                                  "params.a=.5", "params.a=1_000", "params.a=inf", "params.a=0x1F", "params.a=true",
                                  "params.a=abc", "params.a=1,2", "params.a-b.c=1", "+params.a=1", "mlflow.x=1"])
def test_a_number_is_read_as_hydra_reads_it(composer, line):
    from runner.cells import JobComposer

    mine = JobComposer(composer, ["+experiment=baseline"]).parse([line])[0]
    hydras = composer.parse([line])[0]
    assert (mine.key_or_group, mine.value_type, type(mine._value), mine._value) == (
        hydras.key_or_group, hydras.value_type, type(hydras._value), hydras._value)


def test_a_grid_over_a_config_group_composes_each_option(composer):
    grid = grid_of(composer, ["+experiment=baseline", "model=logistic_regression,random_forest"])
    grid.check(open_store=False)
    assert [grid.specs[i].params["model"]["type"] for i in range(2)] == ["logistic_regression", "random_forest"]


def test_every_bad_key_of_a_grid_is_reported_once(composer):
    grid = grid_of(composer, ["+experiment=baseline", "params.modle.C=1,2,3"])
    with pytest.raises(ConfigError) as info:
        grid.check(open_store=False)
    assert str(info.value).count("params.modle (") == 1 and "Did you mean params.model" in str(info.value)


def test_resume_skips_finished_cells_and_the_rest_get_parent_and_own_dirs(composer, tmp_path):
    grid = grid_of(composer, ["+experiment=baseline", "params.model.C=0.1,1,10,100"])
    grid.check(open_store=False)
    store = StoreStub({grid.specs[1].config_hash: "done-run"}, taken={grid.specs[3].config_hash},
                      tags=grid.specs[1].fingerprint.tags())
    skipped, previous = grid.resume(store, rerun=False)
    assert (skipped, previous, grid.planned) == (1, None, 3)
    assert grid.outcomes[1].status is Status.SKIPPED and grid.outcomes[1].run_id == "done-run"
    grid.start(store, "parent-1", tmp_path)
    jobs = [grid.next(), grid.next(), grid.next()]
    assert jobs[2] is None and not grid.exhausted()  # cell 3 runs in another process: waited for
    assert [j.outcome.index for j in jobs[:2]] == [0, 2]
    store.elsewhere = "FINISHED"
    grid.wait_outside()  # ... which finished it
    assert grid.exhausted() and grid.outcomes[3].status is Status.SKIPPED and grid.taken == 1
    assert grid.outcomes[3].metrics == {"accuracy": 0.7}
    assert jobs[0].spec.run_id == f"run-{grid.specs[0].config_hash[:4]}"
    assert {j.spec.parent_run_id for j in jobs[:2]} == {"parent-1"}
    assert [Path(j.spec.output_dir) for j in jobs[:2]] == [tmp_path / "0", tmp_path / "2"]
    grid.record(jobs[0], JobResult("r0", Status.FINISHED, {"accuracy": 0.9}, 0.9))
    assert grid.outcomes[0].score() == 0.9
    assert grid.resume(store, rerun=True) == (0, None) and grid.planned == 4
    stale = StoreStub({grid.specs[1].config_hash: "old-run"}, tags={**grid.specs[1].fingerprint.tags(),
                                                                      "kmrun.fp.code": "0", "kmrun.fingerprint": "0"})
    assert grid.resume(stale, rerun=False) == (0, None) and grid.stale == ["code"]  # code changed: runs again


def test_a_cell_whose_other_process_died_is_claimed_again(composer, tmp_path):
    grid = grid_of(composer, ["+experiment=baseline", "params.model.C=0.1,1"])
    grid.check(open_store=False)
    store = StoreStub(taken={grid.specs[1].config_hash})
    grid.resume(store, rerun=False)
    grid.start(store, "parent-1", tmp_path)
    first, second = grid.next(), grid.next()
    assert first.outcome.index == 0 and second is None and not grid.exhausted()
    store.owner_lives = False
    grid.wait_outside()  # its owner is gone: the cell is this grid's again
    again = grid.next()
    assert again is not None and again.outcome.index == 1 and grid.exhausted()


def test_a_study_asks_until_its_target_and_records_trials(composer, tmp_path):
    from runner.space import search_space
    from runner.study import Study

    args = ["+experiment=baseline", "+study=tune", f"study.storage=sqlite:///{tmp_path / 'optuna.db'}",
            "study.n_trials=3"]
    base, space = search_space(composer, parse(composer.compose(args)).study.search_space, args)
    conf = parse(composer.compose(base))
    study = Study(composer, conf, base, space, "unit")
    study.check()
    store = StoreStub()
    assert study.begin(store) == [] and study.planned == 3
    study.start("parent-s", tmp_path)
    first, second = study.next(), study.next()
    assert first.spec.trial.number == 0 and first.spec.parent_run_id == "parent-s"
    assert first.spec.output_dir == str(tmp_path / "trial-0")
    assert set(first.spec.params["model"]) >= {"C", "max_iter"}
    study.record(first, JobResult("r0", Status.FINISHED, {"accuracy": 0.8}, 0.8))
    study.record(second, JobResult("r1", Status.FAILED, {}, None))
    third, fourth = study.next(), study.next()
    assert third is not None and fourth is not None  # the failed trial does not count
    study.record(third, JobResult("r2", Status.PRUNED, {}, None))
    study.record(fourth, JobResult("r3", Status.FINISHED, {"accuracy": 0.9}, 0.9))
    assert study.next() is None and study.exhausted()
    summary = study.summary(export_to=tmp_path / "best.yaml")
    study.close()
    assert summary.states == {"COMPLETE": 2, "FAIL": 1, "PRUNED": 1} and summary.finished == 3
    assert summary.best[0].number == 3 and summary.best[0].values == [0.9]
    assert (tmp_path / "best.yaml").read_text() == summary.best_experiment
    assert "params.model.C" in summary.trials_csv


def test_oc_env_works_in_kmruns_config_after_kedro_has_loaded_its_own(ws, monkeypatch):
    """Kedro's config loader unregisters OmegaConf's oc.env for the whole process."""
    import os

    monkeypatch.chdir(ws.path)
    monkeypatch.setenv("KMRUN_TEST_TAG", "from-env")
    path = ws.path / "conf/kmrun.yaml"
    path.write_text(path.read_text().replace("  tags: {}", "  tags: {owner: '${oc.env:KMRUN_TEST_TAG}'}"))
    for _ in range(2):  # the second call composes after Kedro ran in this process
        with Composer() as composer:
            grid = grid_of(composer, ["+experiment=baseline", "model=logistic_regression,random_forest"])
            grid.check(open_store=False)
        assert {spec.conf.mlflow.tags["owner"] for spec in grid.specs.values()} == {"from-env"}
        assert os.environ["KMRUN_TEST_TAG"] == "from-env"


@pytest.mark.parametrize("values", [{"params.model.C": 1e-05}, {"params.model.C": 0.5, "params.model.max_iter": 50},
                                    {"params.model.type": "random_forest", "params.model.n_estimators": 7},
                                    {"params.model.C": 2.0, "params.split.test_size": 0.3}])
def test_a_study_trials_spec_equals_its_full_composition(composer, values):
    """A study's trial is the shared config with its params set (``spec_of``), as a grid's cell:
    the spec must be the one Hydra's full composition of the same lines gives."""
    from runner.cells import JobComposer, spec_of
    from runner.job import prepare
    from runner.study import _literal

    base = ["+experiment=baseline"]
    lines = [f"{key}={_literal(value)}" for key, value in values.items()]
    spec = spec_of(JobComposer(composer, base), lines, base + lines, composer.config_dir, open_store=False)
    full = prepare(composer.compose(base + lines), base + lines, None, composer.config_dir, open_store=False)
    assert (spec.conf, spec.params, spec.config, spec.config_hash, spec.fingerprint, spec.redact.values) == (
        full.conf, full.params, full.config, full.config_hash, full.fingerprint, full.redact.values), lines
