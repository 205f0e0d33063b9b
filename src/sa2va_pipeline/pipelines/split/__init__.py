"""``split``: leakage-free train/val/test split by video or patient."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
