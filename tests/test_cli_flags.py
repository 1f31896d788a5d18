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
    assert "usage: kmrun" in out and "experiment: baseline, forest" in out and "study: prune, tune" in out


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
