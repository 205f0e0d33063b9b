"""Nodes of the ``annotation`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from sa2va_pipeline.data.annotations import annotate_objects

log = logging.getLogger(__name__)


def _metrics(entries: list[dict[str, Any]], report: pd.DataFrame) -> dict[str, float]:
    raster = report[report["dice"].notna()]
    dice = raster["dice"].astype(float)
    return {
        "entries": len(entries),
        "objects": len(report),
        "phrases": int(report["phrase"].nunique()),
        "images_without_objects": sum(1 for e in entries if not e["text"]),
        "dice_mean": float(dice.mean()) if len(dice) else float("nan"),
        "dice_min": float(dice.min()) if len(dice) else float("nan"),
        "below_floor": int(report["below_floor"].sum()),
        "invalid_objects": int((~report["valid"].astype(bool)).sum()),
    }


def build_annotations(manifest: pd.DataFrame, objects: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Write the ONE annotations.json (Sa2VA format) of the ingested images from their objects, and report
    every object: raster objects (masks, label maps, RLE) as polygons with their round-trip Dice, polygon
    objects (annotations.json, COCO) kept verbatim with their filled pixel count and validity.

    Returns ``annotations`` (one entry per manifest row), ``report`` (one row per object) and ``metrics``.
    """
    entries, report = annotate_objects(manifest, objects, float(params["dice_floor"]))
    low = report[report["below_floor"].astype(bool)]
    if len(low):
        log.warning("annotation: %d object(s) reproduce their mask with Dice below %.4f, e.g. %s",
                    len(low), params["dice_floor"], low["origin"].head(5).tolist())
    invalid = report[~report["valid"].astype(bool)]
    if len(invalid):
        log.warning("annotation: %d polygon object(s) have a polygon that fills no pixel, e.g. %s",
                    len(invalid), invalid["origin"].head(5).tolist())
    metrics = _metrics(entries, report)
    per_phrase = report.groupby("phrase").size().to_dict() if len(report) else {}
    log.info("annotation: %d entries, %d objects %s; round-trip Dice mean %.6f, min %.6f",
             metrics["entries"], metrics["objects"], per_phrase, metrics["dice_mean"], metrics["dice_min"])
    return {
        "annotations": entries,
        "report": report,
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()},
    }
