"""Digits: a small Kedro project that trains a scikit-learn classifier on the digits dataset."""

__version__ = "0.1"
