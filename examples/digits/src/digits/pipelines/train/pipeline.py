"""load → split → train → evaluate."""

from kedro.pipeline import Pipeline, node

from .nodes import evaluate_model, load_digits, split_data, train_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(load_digits, inputs=None, outputs="digits", name="load", tags=["data"]),
            node(
                split_data,
                inputs=["digits", "params:split"],
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
            node(
                evaluate_model,
                inputs=["model", "X_test", "y_test"],
                outputs="metrics",
                name="evaluate",
                tags=["model"],
            ),
        ]
    )
