"""Nodes of the ``evaluation`` pipeline: test probabilities, per-image metrics and summary, overlays.

Every split is scored at the threshold frozen on validation (the ``frozen_threshold`` input); 0.5 and the
per-image oracle are reported next to it for reference only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.evaluation.overlays import (
    add_legend_strip,
    error_overlay,
    overlay_grid_figure,
    pick_best_median_worst,
)
from sa2va_pipeline.evaluation.probabilities import ProbabilityMaps, binarize
from sa2va_pipeline.evaluation.report import evaluate_split, summary_metrics
from sa2va_pipeline.evaluation.split_data import load_split_samples, predict_split_probabilities, truth_mask
from sa2va_pipeline.evaluation.threshold_sweep import threshold_grid

logger = logging.getLogger(__name__)


def predict_test_probabilities(
    trained_model: Path,
    split_manifest: pd.DataFrame,
    stored_test_probabilities: ProbabilityMaps | None,
    phrase: str,
    prediction: dict[str, Any],
) -> ProbabilityMaps:
    """Test probability maps of the trained model; the stored ones if made by the same model."""
    return predict_split_probabilities(
        trained_model, split_manifest, "test", phrase, prediction, stored=stored_test_probabilities
    )


def score_split(
    probabilities: ProbabilityMaps,
    split_manifest: pd.DataFrame,
    frozen_threshold: dict[str, Any],
    phrase: str,
    evaluation: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """Per-image metrics, summary.json and MLflow metrics of one split at the frozen threshold."""
    model_now = probabilities.metadata.get("model", {}).get("fingerprint")
    model_then = frozen_threshold.get("model", {}).get("fingerprint")
    if model_now and model_then and model_now != model_then:
        logger.warning(
            "The frozen threshold was chosen for another model (%s) than the one scored on %s (%s): "
            "re-run `kedro run --pipeline=threshold` first",
            model_then,
            split,
            model_now,
        )
    samples = load_split_samples(split_manifest, split, phrase, ids=probabilities.ids())
    truths = {s["id"]: truth_mask(s) for s in samples}
    grid = frozen_threshold.get("grid", {"start": 0.05, "stop": 0.95, "step": 0.01})
    table, summary = evaluate_split(
        probabilities,
        truths,
        threshold=float(frozen_threshold["threshold"]),
        oracle_grid=threshold_grid(grid["start"], grid["stop"], grid["step"]),
        split=split,
        hd_percentile=float(evaluation.get("hd_percentile", 95.0)),
        reference_threshold=float(evaluation.get("reference_threshold", 0.5)),
        extra={
            "frozen_threshold": {k: v for k, v in frozen_threshold.items() if k != "model"},
            "threshold_model": frozen_threshold.get("model", {}),
            "probabilities_model": probabilities.metadata.get("model", {}),
            "same_model": bool(model_now and model_now == model_then),
        },
    )
    at = summary["at_threshold"]
    logger.info(
        "%s at threshold %.2f: Dice %.4f +- %.4f per image, %.4f pooled (%d images)",
        split,
        summary["threshold"],
        at["mean"]["dice"]["mean"],
        at["mean"]["dice"]["sd"] or 0.0,
        at["pooled"]["dice"],
        summary["n_images"],
    )
    return {"per_image": table, "summary": summary, "metrics": summary_metrics(summary)}


def draw_overlays(
    probabilities: ProbabilityMaps,
    per_image: pd.DataFrame,
    split_manifest: pd.DataFrame,
    frozen_threshold: dict[str, Any],
    phrase: str,
    evaluation: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """Overlays (TP/FP/FN colours) of the best, median and worst frames by Dice, and a grid figure.

    Returns ``overlays`` ({file name: PNG bytes}, for a ``FileFolderDataset``) and ``grid`` (a figure).
    """
    from sa2va_pipeline.data.image_io import encode_png

    overlay_params = evaluation.get("overlay", {})
    colors = overlay_params.get("colors")
    alpha = float(overlay_params.get("alpha", 0.7))
    threshold = float(frozen_threshold["threshold"])
    picks = pick_best_median_worst(dict(zip(per_image["id"].astype(str), per_image["dice"])))
    samples = {
        s["id"]: s for s in load_split_samples(split_manifest, split, phrase, ids=sorted(set(picks.values())))
    }
    dice_by_id = dict(zip(per_image["id"].astype(str), per_image["dice"]))
    files: dict[str, bytes] = {}
    panels = []
    for rank, sample_id in picks.items():
        sample = samples[sample_id]
        pred = binarize(probabilities.probabilities(sample_id), threshold)
        overlay = error_overlay(sample["image"], pred, truth_mask(sample), colors, alpha)
        files[f"{rank}_{sample_id}.png"] = encode_png(add_legend_strip(overlay, colors))
        panels.append({"overlay": overlay, "title": f"{rank}: {sample_id}\nDice {dice_by_id[sample_id]:.3f}"})
    grid = overlay_grid_figure(
        panels, colors, title=f"{split}: best, median and worst frame by Dice at threshold {threshold:.2f}"
    )
    return {"overlays": files, "grid": grid}
