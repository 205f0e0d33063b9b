"""Nodes of the ``external_evaluation`` pipeline: thin adapters from the catalog to
``sa2va_pipeline.evaluation.external`` (ingestion, annotation, prediction and scoring are the project's one
implementation of each; only the inputs and the output entries differ from the main chain)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.data.ingestion import summarise_report
from sa2va_pipeline.data.samples import dataset_phrases, load_samples
from sa2va_pipeline.evaluation import external
from sa2va_pipeline.evaluation.frozen_threshold import record_phrases, thresholds_by_phrase
from sa2va_pipeline.evaluation.overlay_panels import evaluation_overlays
from sa2va_pipeline.evaluation.report import metric_key, summary_metrics
from sa2va_pipeline.pipelines.ingestion.nodes import ingestion_config
from sa2va_pipeline.prediction.maps import ProbabilityMaps

log = logging.getLogger(__name__)


def _groups(manifest: pd.DataFrame) -> dict[str, str]:
    return dict(zip(manifest["id"].astype(str), manifest["group"].astype(str)))


def _as_metrics(values: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {k: {"value": float(v), "step": 0} for k, v in values.items() if v is not None}


def ingest_external_data(
    evaluation: dict[str, Any],
    ingestion: dict[str, Any],
    phrase: str,
    group_regex: str,
    raw_dir: str,
    trained_model: Path,
    frozen_threshold: dict[str, Any],
) -> dict[str, Any]:
    """Check and ingest ``evaluation.external_dir`` with the ingestion pipeline's settings and code (any
    layout); outputs as the ingestion node's, for the ``external_*`` entries.

    ``trained_model`` and ``frozen_threshold`` are inputs so that a run with nothing trained, or a folder that
    shares no phrase with the model, stops here, before anything is written.
    """
    del trained_model  # loaded only to fail early: the prediction node reads it
    root, result = external.ingest_external(
        evaluation.get("external_dir"), ingestion_config(ingestion, phrase, group_regex)
    )
    if Path(raw_dir).absolute().resolve() == root.resolve():
        log.warning("external_dir %s is raw_dir, the data the model was trained and thresholded on: these "
                    "numbers are not an external evaluation", root)
    external.check_phrases(record_phrases(frozen_threshold) or [phrase], external.planned_phrases(result.objects),
                           str(root))
    counts = {**summarise_report(result.report), "samples": len(result.records),
              "objects": int(result.records["n_objects"].sum()), "ignored_files": len(result.ignored)}
    log.info("external ingestion of %s (%s source): %d files in, %d ok, %d fixed, %d rejected -> %d images",
             root, result.source, counts["files_in"], counts["ok"], counts["fixed"], counts["rejected"],
             counts["samples"])
    if counts["rejected"]:
        log.warning("external ingestion rejected %d file(s): see data/08_reporting/external/ingestion_report.csv",
                    counts["rejected"])
    return {"report": result.report, "files": result.files, "records": result.records,
            "objects": result.objects, "metrics": _as_metrics(counts)}


def predict_external_probabilities(
    trained_model: Path,
    manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any],
    phrase: str,
    prediction: dict[str, Any],
) -> ProbabilityMaps:
    """Maps of every trained phrase (those the threshold was frozen for) on every external image."""
    phrases = record_phrases(frozen_threshold) or [phrase]
    return external.predict_external_maps(trained_model, load_samples(manifest, annotations), phrases, prediction)


def score_external(
    probabilities: ProbabilityMaps,
    manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    ingestion_report: pd.DataFrame,
    annotation_report: pd.DataFrame,
    frozen_threshold: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """Per-image metrics and the summary (summary.json's schema + ``dataset``) at the FROZEN thresholds."""
    phrases = record_phrases(frozen_threshold) or probabilities.phrases()
    samples = load_samples(manifest, annotations, ids=probabilities.ids())
    table, summary = external.score_maps(
        probabilities, samples, _groups(manifest), frozen_threshold, phrases, evaluation
    )
    root = external.external_root(evaluation.get("external_dir"))
    roles = external.phrase_roles(phrases, dataset_phrases(annotations))
    summary["dataset"] = external.dataset_block(root, manifest, annotations, ingestion_report, annotation_report, roles)
    for name, block in summary["phrases"].items():
        dice = block["at_threshold"]["mean"]["dice"]
        log.info("external %s at frozen threshold %.2f: Dice %.4f (95%% CI %s) per image, %.4f pooled (%d images)",
                 name, block["threshold"], dice["mean"] or 0.0, dice.get("ci95"),
                 block["at_threshold"]["pooled"]["dice"] or 0.0, block["n_images"])
    return {"per_image": table, "summary": summary, "metrics": summary_metrics(summary)}


def score_external_baseline(
    baseline_model: Any,
    baseline_frozen_threshold: dict[str, Any] | None,
    manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    sa2va_per_image: pd.DataFrame,
    evaluation: dict[str, Any],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """The saved baseline (if any) at its frozen thresholds on the external images, paired with Sa2VA."""
    block = external.score_baseline(
        baseline_model, baseline_frozen_threshold, load_samples(manifest, annotations), _groups(manifest),
        sa2va_per_image, evaluation, baseline.get("device", "auto"),
    )
    metrics: dict[str, Any] = {}
    if block["available"]:
        for phrase, scored in block["phrases"].items():
            key = metric_key(phrase)
            metrics[f"{key}.dice_mean"] = scored["at_threshold"]["mean"]["dice"]["mean"]
            metrics[f"{key}.dice_pooled"] = scored["at_threshold"]["pooled"]["dice"]
            metrics[f"{key}.threshold"] = scored["threshold"]
        for phrase, compared in block["comparison"]["phrases"].items():
            metrics[f"{metric_key(phrase)}.dice_difference_mean"] = compared["dice"]["difference"]["mean"]
    else:
        log.info("external evaluation: %s", block["note"])
    return {"baseline": block, "metrics": _as_metrics(metrics)}


def assemble_external_summary(summary: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The external summary.json: Sa2VA's summary, its ``dataset`` block and the ``baseline`` block."""
    return external.external_summary(summary, baseline)


def draw_external_overlays(
    probabilities: ProbabilityMaps,
    per_image: pd.DataFrame,
    manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    frozen_threshold: dict[str, Any],
    overlay: dict[str, Any],
) -> dict[str, Any]:
    """Per phrase, overlays of the best, median and worst external frame by Dice, and a grid figure."""
    phrases = record_phrases(frozen_threshold) or probabilities.phrases()
    files, grid = evaluation_overlays(
        probabilities, per_image, lambda ids: load_samples(manifest, annotations, ids=ids),
        thresholds_by_phrase(frozen_threshold, phrases), overlay,
        title="external: best, median and worst frame by Dice per phrase",
    )
    return {"overlays": files, "grid": grid}
