"""Nodes of the ``split`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from sa2va_pipeline.data.samples import check_annotations_cover
from sa2va_pipeline.data.split import check_split_sizes, split_manifest, split_sizes

log = logging.getLogger(__name__)


def split_samples(
    manifest: pd.DataFrame, annotations: list[dict[str, Any]], params: dict[str, Any]
) -> dict[str, Any]:
    """Assign every accepted sample to train/val/test by group (or from the user's split file), after checking
    that every manifest image has its annotations.json entry (the only ground truth downstream).

    Returns ``manifest`` (the split manifest) and ``metrics`` (the split sizes).
    """
    check_annotations_cover(manifest, annotations)
    table = split_manifest(
        manifest,
        fractions=params["fractions"],
        seed=int(params["seed"]),
        group_regex=params.get("group_regex"),
        split_file=params.get("split_file"),
    )
    check_split_sizes(table, allow_empty_test=bool(params["allow_empty_test"]))
    sizes = split_sizes(table)
    log.info("split: %s", ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return {"manifest": table, "metrics": {k: {"value": float(v), "step": 0} for k, v in sizes.items()}}
