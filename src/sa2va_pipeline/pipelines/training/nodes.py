"""Node of the ``training`` pipeline: load -> train -> hand over for saving, in one node.

The model never travels between nodes (Kedro would deep-copy it); the node returns the in-memory
``TrainedModel`` to the ``trained_model`` dataset, which writes the folder. Live metrics go to MLflow when
a run is active (kedro-mlflow opens one), through the callback the training library takes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def mlflow_metrics_logger() -> Any:
    """A ``(metrics, step)`` callback logging grouped training metrics to the active MLflow run, or None when
    there is none (``tracking.training_metrics_logger``; kept under this name for other nodes)."""
    from sa2va_pipeline.tracking import training_metrics_logger

    return training_metrics_logger()


def training_summary(trained: Any) -> dict[str, Any]:
    """The JSON summary of a run: untrained vs trained validation Dice, steps, time, counts, history."""
    result = trained.result
    evals = result.evaluations
    first = evals[0] if evals and evals[0]["step"] == 0 else None
    last = evals[-1] if evals else None
    return {
        "model_source": trained.config.model.describe(),
        "recipe": trained.config.recipe,
        "steps_done": result.steps_done,
        "total_steps": result.total_steps,
        "stopped_by_time": result.stopped_by_time,
        "wall_time_s": result.wall_time_s,
        "val_dice_best_threshold_untrained": first["val_dice_best_threshold"] if first else None,
        "val_dice_best_threshold": last["val_dice_best_threshold"] if last else None,
        "val_best_threshold": last["val_best_threshold"] if last else None,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "plan": result.plan,
        "run_dir": result.run_dir,
        "parameter_counts": result.parameter_counts,
        "gradient_report": result.gradient_report,
        "evaluations": evals,
        "history": result.history,
    }


def train_model(
    split_manifest: pd.DataFrame, annotations: list[dict[str, Any]], training: dict[str, Any]
) -> dict[str, Any]:
    """Fine-tune Sa2VA on the train split, validating on val; returns the model, its summary and plot.

    Ground truth comes from the annotations.json entries only (every object with its phrase).

    Outputs: ``model`` (the in-memory trained model, written by ``TrainedModelDataset``), ``summary``
    (JSON) and ``loss_curve`` (figure).
    """
    started_at = time.monotonic()
    from sa2va_pipeline.data.samples import load_samples
    from sa2va_pipeline.training.plots import loss_curve_figure
    from sa2va_pipeline.training.recipe import check_training_data, run_training

    train_samples = load_samples(split_manifest, annotations, split="train")
    val_samples = load_samples(split_manifest, annotations, split="val")
    check_training_data(train_samples, val_samples, training)
    log.info("Training on %d frames, validating on %d", len(train_samples), len(val_samples))
    logger = mlflow_metrics_logger()
    trained = run_training(train_samples, val_samples, training, log_metrics=logger, started_at=started_at)
    summary = training_summary(trained)
    if logger is not None:
        final = {k: summary[k] for k in ("val_dice_best_threshold_untrained", "val_dice_best_threshold")}
        logger({f"final_{k}": v for k, v in final.items() if v is not None}, trained.result.steps_done)
    figure = loss_curve_figure(trained.result.history, trained.result.evaluations)
    return {
        "model": trained,
        "summary": summary,
        "loss_curve": figure,
    }
