"""Node functions. Plain Python: they know nothing about kmrun, Hydra or MLflow,
except that the epoch-trained model reports its validation score through
``runner.report`` when kmrun is installed, so that an Optuna study can prune it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import datasets
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

try:
    from runner import report
except ImportError:  # the project also runs with plain `kedro run`

    def report(value: float, step: int) -> None:
        return None


def load_digits() -> pd.DataFrame:
    """The 8x8 digits images that ship with scikit-learn, one row per image."""
    bunch = datasets.load_digits(as_frame=True)
    return bunch.frame


def features(images: pd.DataFrame) -> np.ndarray:
    """The 64 pixel columns (0-16) scaled to [0, 1]; a ``target`` column is left out."""
    return images.drop(columns="target", errors="ignore").to_numpy(dtype=np.float64) / 16.0


def predict(estimator: ClassifierMixin, X: np.ndarray) -> np.ndarray:
    return estimator.predict(X)


def split_data(data: pd.DataFrame, split: dict[str, Any]):
    X = features(data)
    y = data["target"].to_numpy()
    return train_test_split(
        X, y, test_size=split["test_size"], random_state=split["seed"], stratify=y
    )


def train_model(X_train, y_train, X_test, y_test, model: dict[str, Any]):
    """Build the estimator named by ``model.type`` and fit it.

    Returns the fitted model and its per-epoch validation accuracy (one value for
    estimators that are not trained in epochs)."""
    kind = model["type"]
    if kind == "logistic_regression":
        estimator: ClassifierMixin = LogisticRegression(C=model["C"], max_iter=model["max_iter"])
    elif kind == "random_forest":
        estimator = RandomForestClassifier(
            n_estimators=model["n_estimators"], max_depth=model["max_depth"], random_state=0
        )
    elif kind == "sgd":
        return _train_in_epochs(X_train, y_train, X_test, y_test, model)
    else:
        raise ValueError(
            f"Unknown model.type {kind!r}: use logistic_regression, random_forest or sgd."
        )
    estimator.fit(X_train, y_train)
    return estimator, [float(accuracy_score(y_test, estimator.predict(X_test)))]


def _train_in_epochs(X_train, y_train, X_test, y_test, model: dict[str, Any]):
    estimator = SGDClassifier(loss="log_loss", alpha=model["alpha"], random_state=model["seed"])
    classes = np.unique(y_train)
    rng = np.random.default_rng(model["seed"])
    curve = []
    for epoch in range(model["epochs"]):
        order = rng.permutation(len(X_train))
        estimator.partial_fit(X_train[order], y_train[order], classes=classes)
        score = float(accuracy_score(y_test, estimator.predict(X_test)))
        curve.append(score)
        report(score, epoch)
    return estimator, curve


def evaluate_model(estimator: ClassifierMixin, X_test, y_test) -> dict[str, float]:
    predicted = estimator.predict(X_test)
    return {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "f1_macro": float(f1_score(y_test, predicted, average="macro")),
    }
