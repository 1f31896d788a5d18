"""load → embed (kernel PCA, the costly step no model option changes) → split → train → evaluate."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
