"""``annotation``: the ingested objects -> the one Sa2VA annotations.json, with a per-object fidelity report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
