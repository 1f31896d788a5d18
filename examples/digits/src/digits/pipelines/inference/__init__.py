"""Predict digits from raw images with a trained model: what kmrun packages as a model."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
