"""``ingestion``: checks raw images and their label source, writes normalised copies, the manifest, the
objects of each image and a per-file report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
