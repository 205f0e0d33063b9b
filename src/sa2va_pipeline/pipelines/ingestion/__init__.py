"""``ingestion``: checks raw images/masks, writes normalised copies, the manifest and a per-file report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
