"""Nodes of the ``sample_data`` pipeline."""

from __future__ import annotations

from typing import Any

from sa2va_pipeline.data.synthetic import generate_from_params


def generate_sample_data(params: dict[str, Any]) -> dict[str, Any]:
    """Write the synthetic sample into ``params["output_dir"]`` (and unlabelled frames into
    ``params["new_images_dir"]``) unless it is already there; return a small summary.

    Ingestion does not depend on this node: it generates the sample itself when ``raw_dir`` is the
    sample's folder. If a folder holds data we did not generate, nothing is written: the summary says so.
    """
    return generate_from_params(params)
