"""The digits with a real preprocessing stage: a kernel PCA embedding that costs far more
than fitting the model on it. A sweep over ``model.*`` never changes it, so kmrun's node
cache computes it once (``kedro.pipeline=features``)."""

from kedro.pipeline import Pipeline, node

from ..train.nodes import evaluate_model, load_digits, split_data, train_model
from .nodes import embed


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(load_digits, inputs=None, outputs="digits", name="load", tags=["data"]),
            node(embed, inputs=["digits", "params:features"], outputs="embedded", name="embed", tags=["data"]),
            node(
                split_data,
                inputs=["embedded", "params:split"],
                outputs=["X_train", "X_test", "y_train", "y_test"],
                name="split",
                tags=["data"],
            ),
            node(
                train_model,
                inputs=["X_train", "y_train", "X_test", "y_test", "params:model"],
                outputs=["model", "training_curve"],
                name="train",
                tags=["model"],
            ),
            node(evaluate_model, inputs=["model", "X_test", "y_test"], outputs="metrics", name="evaluate",
                 tags=["model"]),
        ]
    )
