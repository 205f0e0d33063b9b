"""Nodes of the ``baseline`` pipeline: thin adapters from the catalog to ``sa2va_pipeline.baseline`` and the
shared evaluation protocol (``evaluation.protocol``): same split, same phrases, same threshold sweep on val,
same metric code on test as Sa2VA."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from sa2va_pipeline.evaluation.protocol import (
    as_probability_maps,
    choose_thresholds,
    model_phrases,
    score_phrases,
    split_samples,
)
from sa2va_pipeline.evaluation.report import metric_key

log = logging.getLogger(__name__)


def _mlflow_logger() -> Any:
    from sa2va_pipeline.pipelines.training.nodes import mlflow_metrics_logger

    return mlflow_metrics_logger()


def train_baseline(
    split_manifest: pd.DataFrame, annotations: list[dict[str, Any]], baseline: dict[str, Any]
) -> dict[str, Any]:
    """Train the DynUNet (one channel per phrase) on the train split; returns its files for ``baseline_model``."""
    from sa2va_pipeline.baseline.recipe import baseline_files
    from sa2va_pipeline.baseline.recipe import train_baseline as train

    phrases = model_phrases(split_manifest, annotations)
    model = train(
        split_samples(split_manifest, annotations, "train"), phrases, baseline, log_metrics=_mlflow_logger()
    )
    return {"model": baseline_files(model), "summary": {**model.summary, "phrases": phrases}}


def predict_baseline_maps(
    baseline_model: Any,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """Validation and test probability maps (per phrase) of the saved baseline."""
    from sa2va_pipeline.baseline.recipe import load_baseline, predict_baseline
    from sa2va_pipeline.devices import resolve_device

    model = load_baseline(baseline_model, resolve_device(baseline.get("device", "auto")))
    identity = {"model_dir": str(baseline_model.root), "kind": "baseline-dynunet"}
    return {
        split: as_probability_maps(
            predict_baseline(model, split_samples(split_manifest, annotations, split)), split, identity
        )
        for split in ("val", "test")
    }


def choose_baseline_thresholds(
    val_maps: dict[str, Any],
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    threshold: dict[str, Any],
) -> dict[str, Any]:
    """One threshold per phrase on val with the project's sweep (the same rule as Sa2VA's)."""
    return choose_thresholds(val_maps, split_samples(split_manifest, annotations, "val"), threshold)


def score_baseline(
    test_maps: dict[str, Any],
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    frozen: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """Test metrics at the frozen baseline thresholds: per-image table, summary (with ci95), MLflow metrics."""
    groups = dict(zip(split_manifest["id"].astype(str), split_manifest["group"].astype(str)))
    table, summary = score_phrases(
        test_maps,
        split_samples(split_manifest, annotations, "test"),
        frozen,
        evaluation,
        "test",
        groups,
        evaluation.get("bootstrap"),
    )
    metrics = {}
    for phrase, block in summary["phrases"].items():
        at = block["at_threshold"]
        key = metric_key(phrase)
        metrics[f"test.{key}.dice_mean"] = at["mean"]["dice"]["mean"]
        metrics[f"test.{key}.dice_pooled"] = at["pooled"]["dice"]
        metrics[f"test.{key}.cldice_mean"] = at["mean"]["cldice"]["mean"]
        metrics[f"test.{key}.threshold"] = block["threshold"]
    log.info("baseline test: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if v is not None))
    return {
        "per_image": table,
        "summary": summary,
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items() if v is not None},
    }


def compare_with_sa2va(
    baseline_per_image: pd.DataFrame,
    sa2va_per_image: pd.DataFrame,
    split_manifest: pd.DataFrame,
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """Paired per-image comparison on the test images both scored: Sa2VA minus baseline, per phrase and metric,
    with a group-bootstrap interval of the mean difference."""
    from sa2va_pipeline.evaluation.compare import paired_comparison

    groups = dict(zip(split_manifest["id"].astype(str), split_manifest["group"].astype(str)))
    comparison = paired_comparison(
        sa2va_per_image, baseline_per_image, groups, evaluation.get("bootstrap"), names=("sa2va", "baseline")
    )
    metrics = {
        f"{metric_key(p)}.dice_difference_mean": c["dice"]["difference"]["mean"]
        for p, c in comparison["phrases"].items()
        if c["dice"]["difference"]["mean"] is not None
    }
    return {
        "comparison": comparison,
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()},
    }


def add_baseline_block(sa2va_summary: dict[str, Any], baseline_summary: dict[str, Any],
                       comparison: dict[str, Any]) -> dict[str, Any]:
    """Sa2VA's test summary.json with a ``baseline`` block beside it: the baseline's summary at its own frozen
    thresholds (same images, same metric code) and the paired comparison, Sa2VA minus baseline. Saved as a new
    version of the test summary; the version the evaluation wrote stays as it was."""
    return {**sa2va_summary, "baseline": {"available": True, "model": "MONAI DynUNet", **baseline_summary,
                                          "comparison": comparison}}
