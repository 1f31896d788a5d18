from __future__ import annotations

import pytest

from runner.compose import as_typed, config_hash, hydra_args
from runner.errors import ParamError
from runner.params import added_on_purpose, check_params, coerce

BASE = {
    "split": {"test_size": 0.25, "seed": 42},
    "model": {"type": "logistic_regression", "C": 1.0, "max_iter": 300, "max_depth": None},
    "features": ["a", "b"],
    "flag": True,
}


@pytest.mark.parametrize(
    ("value", "current", "expected"),
    [
        (0.5, 1.0, 0.5),
        (2, 1.0, 2.0),
        (3, 42, 3),
        (3.0, 42, 3),
        ("l1", "l2", "l1"),
        (123, "name", "123"),
        (False, True, False),
        (["x"], ["a", "b"], ["x"]),
        (None, 1.0, None),
        (7, None, 7),
    ],
)
def test_coerce_accepts_fitting_values(value, current, expected):
    out = coerce(value, current)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("value", "current"),
    [("abc", 1.0), (1.5, 42), ("x", 42), (1, True), (True, 1.0), ("a", ["a"]), (1, {"a": 1}), ([1], 1.0)],
)
def test_coerce_rejects_values_that_do_not_fit(value, current):
    with pytest.raises(TypeError, match="does not fit|replaces a whole section"):
        coerce(value, current)


def test_check_params_returns_coerced_nested_overrides():
    out = check_params({"model": {"C": 2, "max_depth": 5}, "split": {"seed": 1.0}}, BASE)
    assert out == {"model": {"C": 2.0, "max_depth": 5}, "split": {"seed": 1}}
    assert isinstance(out["model"]["C"], float) and isinstance(out["split"]["seed"], int)


def test_check_params_lists_every_problem_with_close_matches_and_origin():
    with pytest.raises(ParamError) as info:
        check_params(
            {"modle": {"C": 1}, "model": {"C": "big", "max_iterr": 3}},
            BASE,
            origin=lambda key: f" (from {key})",
        )
    text = str(info.value)
    assert "params.modle (from params.modle)" in text and "Did you mean params.model" in text
    assert "params.model.C (from params.model.C): 'big' (str) does not fit" in text
    assert "params.model.max_iterr" in text and "params.model.max_iter" in text
    assert "+params.KEY=VALUE" in text


def test_check_params_lets_keys_added_on_purpose_through():
    out = check_params({"new": {"x": 1}, "model": {"extra": "y"}}, BASE, added={"new", "model.extra"})
    assert out == {"new": {"x": 1}, "model": {"extra": "y"}}
    out = check_params({"tok": {"a": 1, "b": True}}, BASE, added={"tok.a", "tok.b"})
    assert out == {"tok": {"a": 1, "b": True}}
    with pytest.raises(ParamError, match="tok.c"):
        check_params({"tok": {"a": 1, "c": 2}}, BASE, added={"tok.a"})


def test_check_params_rejects_a_scalar_for_a_section():
    with pytest.raises(ParamError, match="replaces a whole section"):
        check_params({"model": 3}, BASE)


def test_hydra_args_let_params_through_struct_mode_and_keep_plus():
    args = hydra_args(["+experiment=b", "params.model.C=1", "+params.x=2", "mlflow.run_name=r"])
    assert args == ["+experiment=b", "++params.model.C=1", "+params.x=2", "++mlflow.run_name=r"]
    assert as_typed(args) == ["+experiment=b", "params.model.C=1", "+params.x=2", "mlflow.run_name=r"]
    assert added_on_purpose(args) == {"x"}


def test_config_hash_is_stable_and_ignores_run_names_and_key_order():
    a = {"kedro": {"env": None}, "params": {"a": 1, "b": 2}, "metrics": ["m"], "mlflow": {"run_name": "x"}}
    b = {"metrics": ["m"], "params": {"b": 2, "a": 1}, "kedro": {"env": None}, "mlflow": {"run_name": "y"}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "params": {"a": 1, "b": 3}})
    assert len(config_hash(a)) == 16
