"""One error base. The CLI catches ``KmrunError`` once, prints it and exits 2."""

from __future__ import annotations


class KmrunError(Exception):
    """Bad input or set-up: a message for the user, shown without a traceback."""

    exit_code = 2


class ConfigError(KmrunError):
    """kmrun's own config: unknown keys, wrong types, YAML or Hydra composition errors."""


class ParamError(KmrunError):
    """An override under ``params`` that does not fit the Kedro project's parameters."""


class ProjectError(KmrunError):
    """The Kedro project: not found, unknown pipeline, unknown environment."""


class TrackingError(KmrunError):
    """The MLflow store: bad URI, unreachable or unwritable."""


class MetricError(KmrunError):
    """The objective metric is missing or not a finite number."""


class JobFailed(Exception):
    """A job's pipeline raised. The cause is chained; the CLI exits 1."""

    exit_code = 1
