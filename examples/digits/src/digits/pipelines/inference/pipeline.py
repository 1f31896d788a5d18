"""images → features → predictions, with the ``model`` the training pipeline made.

``model.pipeline: inference`` in kmrun's config packages this pipeline with the trained
model as one MLflow model: a caller sends raw images and gets digits back."""

from kedro.pipeline import Pipeline, node

from ..train.nodes import features, predict


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(features, inputs="images", outputs="image_features", name="featurize"),
            node(predict, inputs=["model", "image_features"], outputs="predictions", name="predict"),
        ]
    )
