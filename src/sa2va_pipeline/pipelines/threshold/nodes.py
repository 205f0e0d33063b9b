"""Nodes of the ``threshold`` pipeline: predict val maps once, sweep per phrase, freeze one threshold each.

Thresholds are chosen on the validation split only; the evaluation pipeline takes the frozen threshold JSON
as an input and never chooses anything on test. Ground truth comes from annotations.json only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.samples import load_samples, phrase_truths, split_phrases
from sa2va_pipeline.evaluation.frozen_threshold import (
    frozen_threshold_record,
    split_sweep_table,
    sweep_per_phrase,
    sweep_table,
)
from sa2va_pipeline.evaluation.plots import threshold_sweeps_figure
from sa2va_pipeline.evaluation.report import metric_key
from sa2va_pipeline.evaluation.threshold_sweep import threshold_grid
from sa2va_pipeline.prediction.maps import ProbabilityMaps
from sa2va_pipeline.prediction.model_loading import model_phrases
from sa2va_pipeline.prediction.stored import predict_split_maps

CURVES = ("dice_pooled", "dice_mean", "precision_pooled", "recall_pooled")


def trained_phrases(
    trained_model: Path, split_manifest: pd.DataFrame, annotations: list[dict[str, Any]], phrase: str
) -> list[str]:
    """The phrases the model was trained on: recorded in its folder, else those of the train split's
    annotations, else the ``phrase`` parameter (a single-phrase model)."""
    return model_phrases(trained_model) or split_phrases(split_manifest, annotations, "train") or [phrase]


def predict_val_probabilities(
    trained_model: Path,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    stored_val_probabilities: ProbabilityMaps | None,
    phrase: str,
    prediction: dict[str, Any],
) -> ProbabilityMaps:
    """Val maps of every trained phrase on every val image; the stored ones if made by the same model."""
    phrases = trained_phrases(trained_model, split_manifest, annotations, phrase)
    return predict_split_maps(
        trained_model, split_manifest, annotations, "val", phrases, prediction, stored_val_probabilities
    )


def _curves(sweeps: dict[str, pd.DataFrame]) -> dict[str, list[dict[str, float]]]:
    """The sweep curves as MLflow metric histories ``<phrase>.<curve>`` whose step is threshold x 1000."""
    return {
        f"{metric_key(phrase)}.{column}": [
            {"value": float(v), "step": int(np.rint(t * 1000))}
            for t, v in zip(sweep["threshold"], sweep[column])
        ]
        for phrase, sweep in sweeps.items()
        for column in CURVES
    }


def sweep_val_thresholds(
    val_probabilities: ProbabilityMaps,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    threshold: dict[str, Any],
) -> dict[str, Any]:
    """Pooled and per-image Dice, precision and recall at every grid threshold, per phrase, on validation.

    Returns ``sweep`` (one table, ``phrase`` column first) and ``curves`` (MLflow metric histories).
    """
    samples = load_samples(split_manifest, annotations, split="val", ids=val_probabilities.ids())
    truths = {p: phrase_truths(samples, p) for p in val_probabilities.phrases()}
    grid = threshold_grid(threshold["start"], threshold["stop"], threshold["step"])
    sweeps = sweep_per_phrase(val_probabilities, truths, grid)
    return {"sweep": sweep_table(sweeps), "curves": _curves(sweeps)}


def freeze_threshold(
    threshold_sweep: pd.DataFrame,
    val_probabilities: ProbabilityMaps,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    threshold: dict[str, Any],
) -> dict[str, Any]:
    """Choose each phrase's threshold maximising the configured objective; record where they came from.

    Returns ``threshold`` (the JSON record the evaluation and inference pipelines read, layout in
    ``evaluation.frozen_threshold``) and ``metrics`` (per phrase: chosen threshold and val scores).
    """
    samples = load_samples(split_manifest, annotations, split="val", ids=val_probabilities.ids())
    counts = {p: sum(p in s["phrases"] for s in samples) for p in val_probabilities.phrases()}
    sweeps = split_sweep_table(threshold_sweep, val_probabilities.phrases()[0])
    grid = {k: threshold[k] for k in ("start", "stop", "step")}
    model = val_probabilities.metadata.get("model", {})
    record = frozen_threshold_record(sweeps, threshold["objective"], counts, len(samples), grid, model)
    metrics = {}
    for phrase, chosen in record["thresholds"].items():
        key = metric_key(phrase)
        metrics[f"{key}.chosen"] = chosen["threshold"]
        metrics[f"{key}.val_dice_pooled"] = chosen["dice_pooled"]
        metrics[f"{key}.val_dice_mean"] = chosen["dice_mean"]
    return {"threshold": record, "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()}}


def plot_threshold_sweep(threshold_sweep: pd.DataFrame, frozen_threshold: dict[str, Any]) -> dict[str, Any]:
    """Figure of Dice, precision and recall against threshold, one panel per phrase, its threshold marked."""
    sweeps = split_sweep_table(threshold_sweep, str(frozen_threshold.get("phrase") or ""))
    chosen = frozen_threshold.get("thresholds") or {next(iter(sweeps)): frozen_threshold}
    title = f"Validation threshold sweep ({frozen_threshold.get('n_images', '?')} images)"
    return {"plot": threshold_sweeps_figure(sweeps, chosen, title=title)}
