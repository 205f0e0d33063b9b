"""Node of the ``cross_validation`` pipeline: a thin adapter around
``sa2va_pipeline.evaluation.cross_validation.run_cross_validation``.

Fold models are written to a scratch folder as each fold finishes (never all held in memory) and handed to the
versioned ``cross_validation_folds`` entry as lazy file readers, which move them into the new version one file
at a time.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from sa2va_pipeline.evaluation.report import metric_key


def _fold_writer(root: Path):
    def save_fold(fold: int, model: str, artefacts: dict[str, Any]) -> None:
        folder = root / f"fold_{fold}" / model
        folder.mkdir(parents=True, exist_ok=True)
        if "trained_model" in artefacts:
            from sa2va_pipeline.training.artifacts import save_trained_model

            save_trained_model(artefacts["trained_model"], folder / "trained_model")
        if "baseline_model" in artefacts:
            from sa2va_pipeline.baseline.recipe import baseline_files

            for name, payload in baseline_files(artefacts["baseline_model"]).items():
                (folder / "baseline_model").mkdir(exist_ok=True)
                (folder / "baseline_model" / name).write_bytes(payload)
        (folder / "frozen_threshold.json").write_text(json.dumps(artefacts["frozen_threshold"], indent=2))
        (folder / "summary.json").write_text(
            json.dumps(artefacts["summary"], indent=2, allow_nan=False, default=float)
        )
        artefacts["per_image"].to_csv(folder / "per_image.csv", index=False)
        if "split_manifest" in artefacts:
            artefacts["split_manifest"].to_csv(folder / "split_manifest.csv", index=False)

    return save_fold


def _move_reader(path: Path, keep_alive: Any):
    def read() -> bytes:
        _ = keep_alive  # the scratch folder lives until every file has been read
        data = path.read_bytes()
        path.unlink()
        return data

    return read


def cross_validate(
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    cross_validation: dict[str, Any],
    training: dict[str, Any],
    threshold: dict[str, Any],
    evaluation: dict[str, Any],
    prediction: dict[str, Any],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    """Run the k folds; returns the summary (JSON), fold table (CSV), figure, fold artefacts and MLflow metrics."""
    from sa2va_pipeline.evaluation.cross_validation import cross_validation_figure, run_cross_validation
    from sa2va_pipeline.pipelines.training.nodes import mlflow_metrics_logger

    scratch = tempfile.TemporaryDirectory(prefix="sa2va-cv-", dir=cross_validation.get("work_dir"))
    root = Path(scratch.name)
    params = {
        "cross_validation": cross_validation,
        "training": training,
        "threshold": threshold,
        "evaluation": evaluation,
        "prediction": prediction,
        "baseline": baseline,
    }
    result = run_cross_validation(
        split_manifest, annotations, params, save_fold=_fold_writer(root), log_metrics=mlflow_metrics_logger()
    )
    files = {
        p.relative_to(root).as_posix(): _move_reader(p, scratch)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    return {
        "summary": result["summary"],
        "table": result["table"],
        "per_image": result["per_image"],
        "figure": cross_validation_figure(result["summary"]),
        "folds": files,
        "metrics": summary_metrics(result["summary"]),
    }


def summary_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """MLflow metrics of the whole cross-validation: over-fold mean and SD, pooled mean and its CI bounds."""
    out: dict[str, float] = {}
    for model, phrases in summary["over_folds"].items():
        for phrase, block in phrases.items():
            key = f"{model}.{metric_key(phrase)}"
            for column in ("dice_mean", "dice_pooled", "cldice_mean"):
                out[f"{key}.{column}_over_folds"] = block[column]["mean"]
                out[f"{key}.{column}_sd_over_folds"] = block[column]["sd"]
            pooled = summary["pooled_over_folds"][model][phrase]
            out[f"{key}.pooled.dice_mean"] = pooled["mean"]["dice"]["mean"]
            out[f"{key}.pooled.dice_mean_ci95_low"], out[f"{key}.pooled.dice_mean_ci95_high"] = pooled[
                "mean"
            ]["dice"]["ci95"]
            out[f"{key}.pooled.dice_pooled"] = pooled["pooled"]["dice"]
    return {k: {"value": float(v), "step": 0} for k, v in out.items() if v is not None}
