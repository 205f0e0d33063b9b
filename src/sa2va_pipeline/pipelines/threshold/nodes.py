"""Nodes of the ``threshold`` pipeline: predict validation probabilities once, sweep, freeze a threshold.

The threshold is chosen on the validation split only; the evaluation pipeline takes the frozen
threshold JSON as an input and never chooses anything on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.evaluation.plots import threshold_sweep_figure
from sa2va_pipeline.evaluation.probabilities import ProbabilityMaps
from sa2va_pipeline.evaluation.split_data import load_split_samples, predict_split_probabilities, truth_mask
from sa2va_pipeline.evaluation.threshold_sweep import choose_threshold, sweep_thresholds, threshold_grid


def predict_val_probabilities(
    trained_model: Path,
    split_manifest: pd.DataFrame,
    stored_val_probabilities: ProbabilityMaps | None,
    phrase: str,
    prediction: dict[str, Any],
) -> ProbabilityMaps:
    """Validation probability maps of the trained model; the stored ones if made by the same model."""
    return predict_split_probabilities(
        trained_model, split_manifest, "val", phrase, prediction, stored=stored_val_probabilities
    )


def sweep_val_thresholds(
    val_probabilities: ProbabilityMaps, split_manifest: pd.DataFrame, phrase: str, threshold: dict[str, Any]
) -> dict[str, Any]:
    """Pooled and per-image Dice, precision and recall at every threshold of the grid, on validation.

    Returns ``sweep`` (table) and ``curves`` (the same curves as MLflow metric histories whose step is
    the threshold x 1000, so the MLflow UI draws them).
    """
    samples = load_split_samples(split_manifest, "val", phrase, ids=val_probabilities.ids())
    truths = {s["id"]: truth_mask(s) for s in samples}
    grid = threshold_grid(threshold["start"], threshold["stop"], threshold["step"])
    sweep, _ = sweep_thresholds(dict(val_probabilities.items()), truths, grid)
    curves = {
        column: [
            {"value": float(v), "step": int(np.rint(t * 1000))}
            for t, v in zip(sweep["threshold"], sweep[column])
        ]
        for column in ("dice_pooled", "dice_mean", "precision_pooled", "recall_pooled")
    }
    return {"sweep": sweep, "curves": curves}


def freeze_threshold(
    threshold_sweep: pd.DataFrame, val_probabilities: ProbabilityMaps, threshold: dict[str, Any]
) -> dict[str, Any]:
    """Choose the threshold maximising the configured objective and record where it came from.

    Returns ``threshold`` (the JSON record the evaluation and inference pipelines read) and
    ``metrics`` (chosen threshold and validation scores for MLflow).
    """
    chosen = choose_threshold(threshold_sweep, threshold["objective"])
    record = {
        **chosen,
        "chosen_on": "val",
        "n_images": len(val_probabilities),
        "grid": {"start": threshold["start"], "stop": threshold["stop"], "step": threshold["step"]},
        "model": val_probabilities.metadata.get("model", {}),
        "phrase": val_probabilities.metadata.get("phrase"),
    }
    metrics = {
        "chosen": chosen["threshold"],
        "val_dice_pooled": chosen["dice_pooled"],
        "val_dice_mean": chosen["dice_mean"],
    }
    return {"threshold": record, "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()}}


def plot_threshold_sweep(threshold_sweep: pd.DataFrame, frozen_threshold: dict[str, Any]) -> dict[str, Any]:
    """Figure of Dice, precision and recall against threshold, the frozen threshold marked."""
    title = f"Validation threshold sweep ({frozen_threshold.get('n_images', '?')} images)"
    return {"plot": threshold_sweep_figure(threshold_sweep, frozen_threshold, title=title)}
