"""The preprocessing stage of the ``features`` pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import KernelPCA


def embed(data: pd.DataFrame, features: dict[str, Any]) -> pd.DataFrame:
    """Each image as its coordinates on the leading components of an RBF kernel PCA.

    Returns a frame shaped like the input (feature columns, then ``target``), so the same
    ``split_data`` node reads it; the columns are scaled back to the pixels' range."""
    pixels = data.drop(columns="target").to_numpy(dtype=np.float64) / 16.0
    kpca = KernelPCA(n_components=features["n_components"], kernel="rbf", gamma=features["gamma"],
                     eigen_solver="dense")
    embedded = kpca.fit_transform(pixels)
    embedded = (embedded - embedded.min()) / (embedded.max() - embedded.min()) * 16.0
    frame = pd.DataFrame(embedded, columns=[f"c{i}" for i in range(embedded.shape[1])])
    frame["target"] = data["target"].to_numpy()
    return frame
