"""The digits with a real preprocessing stage: a kernel PCA embedding that costs far more
than fitting the model on it. A sweep over ``model.*`` never changes it, so kmrun's node
cache computes it once (``kedro.pipeline=features``)."""

from kedro.pipeline import Pipeline, node, pipeline

from ..train.pipeline import create_pipeline as train_pipeline
from .nodes import embed


def create_pipeline(**kwargs) -> Pipeline:
    """``train``'s nodes, with the embedding between loading and splitting."""
    train = train_pipeline()
    embedding = Pipeline([
        node(embed, inputs=["digits", "params:features"], outputs="embedded", name="embed", tags=["data"]),
    ])
    model = pipeline(train.only_nodes("split", "train", "evaluate"), inputs={"digits": "embedded"})
    return train.only_nodes("load") + embedding + model
