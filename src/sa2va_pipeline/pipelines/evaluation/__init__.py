"""``evaluation`` pipeline: metrics at the frozen threshold on test and val, summaries, overlays."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
