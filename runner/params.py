"""Overrides under ``params``, checked against the Kedro project's parameters.

Kedro alone accepts any runtime parameter, typos included. Here each override must name
a parameter the project has (or be added on purpose with ``+params.KEY``) with a value of
a fitting type; a near miss is named ("did you mean ...").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from difflib import get_close_matches
from typing import Any

from .errors import ParamError


def added_on_purpose(overrides: list[str]) -> set[str]:
    """Keys added with a single ``+`` (``+params.x=1`` → ``x``), relative to ``params``."""
    keys = set()
    for override in overrides:
        if override.startswith("+params.") and not override.startswith("++"):
            keys.add(override[len("+params.") :].split("=", 1)[0])
    return keys


def check_params(
    overrides: Mapping[str, Any],
    base: Mapping[str, Any],
    added: set[str] = frozenset(),  # type: ignore[assignment]
    origin: Callable[[str], str] = lambda key: "",
) -> dict[str, Any]:
    """Check ``overrides`` against the Kedro parameters ``base``; return them coerced.

    Every leaf must address an existing parameter (or one under a key in ``added``)
    with a value of a fitting type. All problems are reported at once, each with
    where it came from and the closest existing keys.
    """
    problems: list[str] = []
    known = _all_keys(base)
    matches = [0]  # "did you mean" is for a typo or two, not for a file of unknown keys

    def walk(over: Mapping[str, Any], have: Any, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in over.items():
            dotted = f"{path}.{key}" if path else str(key)
            if any(dotted == a or dotted.startswith(a + ".") for a in added):
                out[key] = value
            elif (not isinstance(have, Mapping) or key not in have) and isinstance(value, Mapping) and any(
                a.startswith(dotted + ".") for a in added
            ):  # a new section that keys added on purpose live in
                out[key] = walk(value, {}, dotted)
            elif not isinstance(have, Mapping) or key not in have:
                matches[0] += 1
                close = get_close_matches(dotted, known, n=3, cutoff=0.6) if matches[0] <= SHOWN_PROBLEMS else []
                hint = f" Did you mean {' or '.join('params.' + c for c in close)}?" if close else ""
                problems.append(
                    f"params.{dotted}{origin('params.' + dotted)}: the Kedro project has no "
                    f"parameter '{dotted}'.{hint}"
                )
            elif isinstance(value, Mapping) and isinstance(have[key], Mapping):
                out[key] = walk(value, have[key], dotted)
            else:
                try:
                    out[key] = coerce(value, have[key])
                except TypeError as err:
                    problems.append(f"params.{dotted}{origin('params.' + dotted)}: {err}")
        return out

    checked = walk(overrides, base, "")
    if problems:
        raise ParamError(
            "\n".join(first_of(problems))
            + "\nFix the key or value; to add a new Kedro parameter on purpose, use +params.KEY=VALUE."
        )
    return checked


SHOWN_PROBLEMS = 8


def first_of(problems: list[str]) -> list[str]:
    """At most ``SHOWN_PROBLEMS`` lines, and how many more there are."""
    if len(problems) <= SHOWN_PROBLEMS:
        return problems
    return [*problems[:SHOWN_PROBLEMS], f"... and {len(problems) - SHOWN_PROBLEMS} more like these."]


def coerce(value: Any, current: Any) -> Any:
    """``value`` converted to the type of the parameter's ``current`` value.

    ``None`` on either side is accepted as is. Raises ``TypeError`` with a readable
    message when the value cannot fit.
    """
    if value is None or current is None:
        return value
    kind = type(current).__name__
    bad = TypeError(f"{value!r} ({type(value).__name__}) does not fit the parameter's {kind} value {current!r}.")
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        if isinstance(current, str):
            return str(value).lower()
        raise bad
    if isinstance(current, int):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if isinstance(current, float):
        if isinstance(value, (int, float)):
            return float(value)
        raise bad
    if isinstance(current, str):
        if isinstance(value, (str, int, float)):
            return str(value) if not isinstance(value, str) else value
        raise bad
    if isinstance(current, list):
        if isinstance(value, list):
            return value
        raise bad
    if isinstance(current, Mapping):
        raise TypeError(f"{value!r} replaces a whole section; set its keys instead ({', '.join(current)}).")
    return value


def _all_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _all_keys(value, f"{prefix}{key}.")
    return keys


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Kedro's runtime-params merge: nested dicts merge, everything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        # dict, not Mapping: a first isinstance(x, Mapping) on a big process walks every
        # registered ABC and costs a quarter of a second; Kedro's params are plain dicts
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
