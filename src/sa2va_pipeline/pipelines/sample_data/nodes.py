"""Nodes of the ``sample_data`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

from sa2va_pipeline.data.synthetic import ForeignDataError, SampleSpec, generate_sample

log = logging.getLogger(__name__)


def generate_sample_data(params: dict[str, Any]) -> dict[str, Any]:
    """Write the synthetic sample into ``params["output_dir"]`` (and unlabelled frames into
    ``params["new_images_dir"]``) unless it is already there; return a small summary.

    The summary is an input of ingestion so Kedro runs this first. If a folder holds data we did not
    generate, nothing is written: the summary says so and the run goes on (ingestion reads ``raw_dir``,
    which may well be the user's own data).
    """
    spec_fields = set(SampleSpec.__dataclass_fields__)
    spec = SampleSpec(**{k: v for k, v in params.items() if k in spec_fields})
    try:
        summary = generate_sample(params["output_dir"], params.get("new_images_dir"), spec)
        summary["status"] = "ready"
    except ForeignDataError as exc:
        log.warning("sample_data: %s", exc)
        summary = {"status": "skipped_foreign_data", "reason": str(exc), "params": spec.to_dict()}
    return summary
