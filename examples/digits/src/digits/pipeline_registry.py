"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Register every pipeline under ``digits.pipelines``; ``__default__`` is ``train``.

    ``features`` is the same model on a costly kernel-PCA embedding (for the node cache)."""
    pipelines = find_pipelines(raise_errors=True)
    if "train" in pipelines:  # Kedro may load only the pipelines a run asks for
        pipelines["__default__"] = pipelines["train"]
    return pipelines
