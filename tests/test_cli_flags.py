"""Hydra's flags through kmrun's own command line, in this process (nothing runs)."""

from __future__ import annotations

import pytest

from runner.cli import main, parse_args


def test_cfg_job_prints_the_composed_config(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws.path)
    assert main(["--cfg", "job", "+experiment=baseline", "params.model.C=0.3", "-p", "params.model"]) == 0
    out = capsys.readouterr().out
    assert "C: 0.3" in out and "max_iter: 300" in out and "kedro" not in out


def test_an_extra_config_dir_adds_group_options(ws, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(ws.path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model/tiny.yaml").write_text("# @package params.model\ntype: sgd\nC: 0.25\n")
    assert main(["-cd", str(tmp_path), "model=tiny", "--cfg", "job", "-p", "params.model.C"]) == 0
    assert capsys.readouterr().out.strip() == "0.25"


def test_info_and_help_list_what_hydra_sees(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws.path)
    assert main(["--info", "searchpath"]) == 0
    assert f"file://{ws.path / 'conf'}" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: kmrun" in out and "experiment: baseline, forest" in out and "study: families, prune, tune" in out


def test_a_config_elsewhere_and_under_another_name(ws, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (ws.path / "conf/other.yaml").write_text("kedro:\n  pipeline: train\n")
    assert main(["-cp", str(ws.path / "conf"), "-cn", "other", "--cfg", "job", "-p", "kedro.pipeline"]) == 0
    assert capsys.readouterr().out.strip() == "train"


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--bogus"], "Unknown option '--bogus'"), (["-cp"], "-cp needs a value"), (["--cfg", "nope"], "--cfg nope")],
)
def test_bad_flags_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_flags_anywhere_and_overrides_in_order():
    args = parse_args(["+experiment=a", "-m", "params.x=1", "-cp", "dir", "--verbose", "~params.y"])
    assert args.overrides == ["+experiment=a", "params.x=1", "~params.y"]
    assert (args.multirun, args.verbose, args.config_path) == (True, True, "dir")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--params", "model.C=0.5,split.seed=1"], "kmrun params.model.C=0.5 params.split.seed=1"),
        (["--params=model.C=2"], "kmrun params.model.C=2"),
        (["--pipeline", "train"], "kmrun kedro.pipeline=train"),
        (["--env", "prod"], "kmrun kedro.env=prod"),
        (["--tags", "a,b"], "kmrun kedro.tags=[a,b]"),
    ],
)
def test_kedro_run_flags_are_translated(argv, said, capsys):
    assert main(["+experiment=baseline", *argv]) == 2
    err = capsys.readouterr().err
    assert "`kedro run`'s flag" in err and said in err


@pytest.mark.slow  # runs pipelines
def test_the_config_is_found_from_a_subfolder_and_paths_start_beside_it(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws.path / "examples/digits/src")
    assert main(["--cfg", "job", "-p", "kedro.project_path"]) == 0
    assert capsys.readouterr().out.strip() == "examples/digits"
    import runner

    result = runner.run(["+experiment=baseline"])
    assert result.status == "FINISHED" and (ws.path / "mlflow.db").exists()
    assert not (ws.path / "examples/digits/src/mlflow.db").exists()
    assert ws.client().get_run(result.run_id).info.status == "FINISHED"


def test_no_config_anywhere_says_where_it_looked(tmp_path, monkeypatch, capsys):
    (tmp_path / "a/b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a/b")
    assert main(["+experiment=baseline"]) == 2
    err = capsys.readouterr().err
    assert f"No kmrun.yaml in {tmp_path / 'a/b/conf'} or its parents' conf/" in err and "kmrun init" in err
