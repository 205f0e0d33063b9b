"""``cross_validation`` pipeline: k-fold cross-validation by group of Sa2VA (and optionally the baseline)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
