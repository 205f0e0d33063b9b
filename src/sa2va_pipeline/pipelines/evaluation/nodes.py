"""Nodes of the ``evaluation`` pipeline: test maps, per-image metrics and summary per phrase, overlays.

Every split is scored at the thresholds frozen on validation (the ``frozen_threshold`` input), every trained
phrase on every image; 0.5 and the per-image oracle are reported next to them for reference only. Ground
truth comes from annotations.json only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.data.samples import load_samples
from sa2va_pipeline.evaluation.frozen_threshold import record_phrases, scoring_provenance, thresholds_by_phrase
from sa2va_pipeline.evaluation.overlay_panels import evaluation_overlays
from sa2va_pipeline.evaluation.protocol import score_phrases
from sa2va_pipeline.evaluation.report import summary_metrics
from sa2va_pipeline.prediction.maps import ProbabilityMaps
from sa2va_pipeline.prediction.stored import predict_split_maps

logger = logging.getLogger(__name__)


def predict_test_probabilities(
    trained_model: Path,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    stored_test_probabilities: ProbabilityMaps | None,
    frozen_threshold: dict[str, Any],
    phrase: str,
    prediction: dict[str, Any],
) -> ProbabilityMaps:
    """Test maps of every phrase the threshold was frozen for; the stored ones if made by the same model."""
    phrases = record_phrases(frozen_threshold) or [phrase]
    return predict_split_maps(
        trained_model, split_manifest, annotations, "test", phrases, prediction, stored_test_probabilities
    )


def score_split(
    probabilities: ProbabilityMaps,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any],
    evaluation: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """Per-image metrics (one row per image and phrase), summary.json and MLflow metrics of one split."""
    phrases = record_phrases(frozen_threshold) or probabilities.phrases()
    samples = load_samples(split_manifest, annotations, split=split, ids=probabilities.ids())
    # ci95 beside each phrase's means: a bootstrap over the split's groups (videos/patients), never frames
    groups = dict(zip(split_manifest["id"].astype(str), split_manifest["group"].astype(str)))
    table, summary = score_phrases(probabilities, samples, frozen_threshold, evaluation, split, groups,
                                   evaluation.get("bootstrap"), phrases=phrases,
                                   extra=scoring_provenance(probabilities, frozen_threshold, split), per_case=True)
    for phrase, block in summary["phrases"].items():
        at = block["at_threshold"]
        dice = at["mean"]["dice"]
        logger.info("%s, %s at threshold %.2f: Dice %.4f +- %.4f per image, %.4f pooled (%d images)", split,
                    phrase, block["threshold"], dice["mean"], dice["sd"] or 0.0, at["pooled"]["dice"],
                    block["n_images"])
    return {"per_image": table, "summary": summary, "metrics": summary_metrics(summary)}


def draw_overlays(
    probabilities: ProbabilityMaps,
    per_image: pd.DataFrame,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any],
    overlay: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """Per phrase, overlays (TP/FP/FN colours) of the best, median and worst frame by Dice, and a grid figure.

    Returns ``overlays`` ({file name: PNG bytes}, for a ``FileFolderDataset``) and ``grid`` (a figure).
    """
    phrases = record_phrases(frozen_threshold) or probabilities.phrases()
    thresholds = thresholds_by_phrase(frozen_threshold, phrases)
    files, grid = evaluation_overlays(
        probabilities, per_image, lambda ids: load_samples(split_manifest, annotations, split=split, ids=ids),
        thresholds, overlay, title=f"{split}: best, median and worst frame by Dice per phrase",
    )
    return {"overlays": files, "grid": grid}


# One named node function per split (not functools.partial), so Kedro-Viz shows each node's code and file.
def score_val(
    probabilities: ProbabilityMaps, split_manifest: pd.DataFrame, annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any], evaluation: dict[str, Any],
) -> dict[str, Any]:
    """:func:`score_split` on the ``val`` split."""
    return score_split(probabilities, split_manifest, annotations, frozen_threshold, evaluation, split="val")


def score_test(
    probabilities: ProbabilityMaps, split_manifest: pd.DataFrame, annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any], evaluation: dict[str, Any],
) -> dict[str, Any]:
    """:func:`score_split` on the ``test`` split."""
    return score_split(probabilities, split_manifest, annotations, frozen_threshold, evaluation, split="test")


def draw_val_overlays(
    probabilities: ProbabilityMaps, per_image: pd.DataFrame, split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]], frozen_threshold: dict[str, Any], overlay: dict[str, Any],
) -> dict[str, Any]:
    """:func:`draw_overlays` on the ``val`` split."""
    return draw_overlays(probabilities, per_image, split_manifest, annotations, frozen_threshold, overlay, split="val")


def draw_test_overlays(
    probabilities: ProbabilityMaps, per_image: pd.DataFrame, split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]], frozen_threshold: dict[str, Any], overlay: dict[str, Any],
) -> dict[str, Any]:
    """:func:`draw_overlays` on the ``test`` split."""
    return draw_overlays(
        probabilities, per_image, split_manifest, annotations, frozen_threshold, overlay, split="test"
    )
