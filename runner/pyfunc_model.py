"""The code of the pyfunc models kmrun logs (MLflow's "models from code").

MLflow copies this file into each such model and runs it when the model is loaded, so it
imports nothing from kmrun: only MLflow, Kedro (for a pipeline) and the project's own
package, which the model carries in its ``code/`` folder. ``model_config`` says what to do:

- ``{"kind": "object"}``: the artifact ``object`` is a pickled model with a ``predict``
  method (a library MLflow has no flavor for).
- ``{"kind": "pipeline", "package": ..., "pipeline": ..., "input": ..., "output": ...,
  "params": {"params:x": ...}}``: the named Kedro pipeline of the package runs on the
  caller's input, with the trained datasets (artifacts, one pickle each) and the params
  it reads.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def _load(path: str) -> Any:
    with open(path, "rb") as file:
        return pickle.load(file)


class KmrunModel(PythonModel):
    # its predict takes what the pipeline takes: no type hints, and MLflow's (private) switch
    # that stops MLflow warning about that each time the model loads
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        logging.getLogger("kedro").setLevel(logging.WARNING)  # no "Running node" lines per request
        self.config = dict(context.model_config or {})
        self.data = {name: _load(path) for name, path in context.artifacts.items()}
        self.nodes: list[Any] = []
        if self.config.get("kind") == "pipeline":
            from kedro.framework.project import configure_project, pipelines

            configure_project(self.config["package"])
            pipelines.set_requested([self.config["pipeline"]])
            self.nodes = list(pipelines[self.config["pipeline"]].nodes)  # in the order Kedro runs them

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        if self.config.get("kind") != "pipeline":
            return self.data["object"].predict(model_input)
        values = {**self.data, **self.config["params"], self.config["input"]: model_input}
        for node in self.nodes:
            values.update(node.run({name: values[name] for name in node.inputs}))
        return values[self.config["output"]]


mlflow.models.set_model(KmrunModel())
