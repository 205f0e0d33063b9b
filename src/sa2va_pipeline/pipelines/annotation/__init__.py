"""``annotation``: binary masks -> Sa2VA annotations.json (or a validated user file), with fidelity report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
