"""Wiring of the ``threshold`` pipeline (see nodes.py). Run alone: ``kedro run --pipeline=threshold``."""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Predict (or re-use) val maps per phrase, sweep thresholds, freeze the best one per phrase, plot."""
    return Pipeline(
        [
            node(
                nodes.predict_val_probabilities,
                inputs=[
                    "trained_model",
                    "split_manifest",
                    "annotations",
                    "val_probabilities_stored",
                    "params:phrase",
                    "params:prediction",
                ],
                outputs="val_probabilities",
                name="predict_val_probabilities",
            ),
            node(
                with_mlflow_copies(nodes.sweep_val_thresholds, "sweep"),
                inputs=["val_probabilities", "split_manifest", "annotations", "params:threshold"],
                outputs=outputs_with_copies(
                    {"sweep": "threshold_sweep", "curves": "threshold_sweep_curves"}, "sweep"
                ),
                name="sweep_val_thresholds",
            ),
            node(
                with_mlflow_copies(nodes.freeze_threshold, "threshold"),
                inputs=[
                    "threshold_sweep",
                    "val_probabilities",
                    "split_manifest",
                    "annotations",
                    "params:threshold",
                ],
                outputs=outputs_with_copies(
                    {"threshold": "frozen_threshold", "metrics": "threshold_metrics"}, "threshold"
                ),
                name="freeze_threshold",
            ),
            node(
                with_mlflow_copies(nodes.plot_threshold_sweep, "plot"),
                inputs=["threshold_sweep", "frozen_threshold"],
                outputs=outputs_with_copies({"plot": "threshold_sweep_plot"}, "plot"),
                name="plot_threshold_sweep",
            ),
        ]
    )
