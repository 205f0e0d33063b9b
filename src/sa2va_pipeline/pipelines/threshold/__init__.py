"""``threshold`` pipeline: validation probability maps -> threshold sweep -> frozen threshold."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
