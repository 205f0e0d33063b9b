"""``sample_data``: writes the synthetic angiography-like sample that the default run trains on."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
