"""Nodes of the ``annotation`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from sa2va_pipeline.data.image_io import IMAGE_EXTENSIONS
from sa2va_pipeline.data.annotations import annotate_manifest, read_annotations

log = logging.getLogger(__name__)


def build_annotations(
    manifest: pd.DataFrame, phrase: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Write annotations.json entries from the ingested masks, or take the user's file
    (``params["annotations_path"]``), with ``phrase`` as the text of every object, and measure the polygon round-trip Dice of every sample.

    Returns ``annotations`` (the entries), ``report`` and ``metrics``.
    """
    user_entries = None
    if params.get("annotations_path"):
        sizes: dict[str, tuple[int, int]] = {}
        for row in manifest.itertuples(index=False):
            for key in (str(row.id) + ext for ext in ("", *IMAGE_EXTENSIONS)):
                sizes[key] = (int(row.height), int(row.width))
        user_entries = read_annotations(params["annotations_path"], image_sizes=sizes)
        log.info("annotation: using %d entries of %s", len(user_entries), params["annotations_path"])
    entries, report = annotate_manifest(manifest, phrase, float(params["dice_floor"]), user_entries)
    matched = report[report["source"] != "user_unmatched"]
    low = matched[matched["below_floor"]]
    if len(low):
        log.warning(
            "annotation: %d sample(s) reproduce their mask with Dice below %.4f, e.g. %s",
            len(low), params["dice_floor"], low["id"].head(5).tolist(),
        )
    unmatched = int((report["source"] == "user_unmatched").sum())
    if unmatched:
        log.warning("annotation: %d entr(y/ies) of the user file match no ingested sample (see the report)", unmatched)
    dice = matched["dice"]
    metrics = {
        "entries": len(entries),
        "dice_mean": float(dice.mean()) if len(dice) else float("nan"),
        "dice_min": float(dice.min()) if len(dice) else float("nan"),
        "below_floor": len(low),
        "user_unmatched": unmatched,
    }
    log.info("annotation: %d entries, polygon round-trip Dice mean %.6f, min %.6f",
             metrics["entries"], metrics["dice_mean"], metrics["dice_min"])
    return {
        "annotations": entries,
        "report": report,
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()},
    }
