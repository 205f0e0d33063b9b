"""MLflow naming: metric groups, run names and the effective parameters of a run (no Kedro imports).

MLflow's UI groups metric charts by the part of the name before the first ``/``; the numbered groups
below put the training losses and the validation Dice first:

    1_train/        losses, lr, grad norm, samples/s (per optimiser step)
    2_validation/   validation during training (Dice at the best threshold, per eval step)
    3_val/          evaluation of the val split at the frozen threshold
    4_test/         evaluation of the test split at the frozen threshold
    5_threshold/    the threshold sweep on val and the frozen threshold
    6_data/         ingestion, annotation and split counts
    7_inference/    inference counts
    8_model/        parameter counts
    9_baseline/, 9_cross_validation/   the optional baseline and cross-validation pipelines
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

# Metric datasets (catalog names) -> group.
DATASET_GROUPS = {
    "ingestion_metrics": "6_data",
    "annotation_metrics": "6_data",
    "split_metrics": "6_data",
    "threshold_metrics": "5_threshold",
    "threshold_sweep_curves": "5_threshold",  # val sweep curves, step = threshold x 1000
    "evaluation_metrics_val": "3_val",
    "evaluation_metrics_test": "4_test",
    "inference_metrics": "7_inference",
    "baseline_metrics": "9_baseline",
    "baseline_comparison_metrics": "9_baseline",
    "cross_validation_metrics": "9_cross_validation",
    "external_ingestion_metrics": "8_external",
    "external_annotation_metrics": "8_external",
    "external_evaluation_metrics": "8_external",
    "external_baseline_metrics": "8_external",
}
# Metric-name prefixes of the metrics the dataset groups above name after their stage.
DATASET_NAME_PREFIX = {
    "ingestion_metrics": "ingestion.",
    "annotation_metrics": "annotation.",
    "split_metrics": "split.",
    "baseline_metrics": "baseline.",
    "baseline_comparison_metrics": "comparison.",
    "cross_validation_metrics": "cv.",
    "external_ingestion_metrics": "external.ingestion.",
    "external_annotation_metrics": "external.annotation.",
    "external_evaluation_metrics": "external.",
    "external_baseline_metrics": "external.baseline.",
}


def training_metric_name(name: str) -> str:
    """Group a metric logged by the training loop (``loss``, ``val_dice_best_threshold``, ...)."""
    if "/" in name:
        return name
    if name.startswith(("val_", "eval_", "final_val_")):
        return f"2_validation/{name}"
    if name.startswith("params_trainable"):
        return f"8_model/{name}"
    return f"1_train/{name}"


def dataset_metric_name(dataset_name: str, name: str) -> str:
    """Group a metric of the metrics dataset ``dataset_name`` (e.g. ``split_metrics``, ``train_frames``)."""
    if "/" in name:
        return name
    group = DATASET_GROUPS.get(dataset_name)
    if group is None:
        stage = dataset_name.removesuffix("_metrics")
        return f"9_{stage}/{name}"
    return f"{group}/{DATASET_NAME_PREFIX.get(dataset_name, '')}{name}"


def metric_points(value: Any) -> list[tuple[float, int]]:
    """``(value, step)`` pairs from a number, ``{"value", "step"}`` or a list of those."""
    if isinstance(value, Mapping):
        return [(float(value["value"]), int(value.get("step") or 0))]
    if isinstance(value, (list, tuple)):
        return [point for item in value for point in metric_points(item)]
    return [(float(value), 0)]


def training_metrics_logger(run_id: str | None = None) -> Callable[[dict[str, float], int], None] | None:
    """A ``(metrics, step)`` callback logging grouped training metrics to the active (or given) run."""
    import mlflow

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            return None
        run_id = active.info.run_id
    client = mlflow.tracking.MlflowClient()

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(training_metric_name(k), float(v), now, int(step)) for k, v in metrics.items()]
        client.log_batch(run_id, metrics=batch, synchronous=True)

    return log_metrics


def effective_training_params(training: Mapping[str, Any]) -> dict[str, Any]:
    """``params:training`` as it runs: the chosen recipe merged over the shared settings, nothing shadowed."""
    from sa2va_pipeline.training import config as training_config

    merged = getattr(training_config, "effective_training_params", None)
    if callable(merged):
        return merged(copy.deepcopy(dict(training)))
    return training_config.load_training_config(copy.deepcopy(dict(training))).to_dict()


def model_label(training: Mapping[str, Any] | None) -> str:
    """Short model name for run names: the checkpoint folder's name, else the preset."""
    model = (training or {}).get("model") or {}
    checkpoint = model.get("checkpoint")
    if checkpoint:
        return str(checkpoint).rstrip("/").rsplit("/", 1)[-1]
    return str(model.get("preset") or "model")


def run_name(pipeline_names: list[str], training: Mapping[str, Any] | None, when: float | None = None) -> str:
    """``<pipelines> | <model> | <YYYY-MM-DD HH:MM>`` (``__default__`` reads ``default``)."""
    pipelines = "+".join("default" if n == "__default__" else n for n in pipeline_names) or "default"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when if when is not None else time.time()))
    return f"{pipelines} | {model_label(training)} | {stamp}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out

