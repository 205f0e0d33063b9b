"""``baseline`` pipeline: a MONAI DynUNet trained, thresholded and scored on Sa2VA's split, then compared."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
