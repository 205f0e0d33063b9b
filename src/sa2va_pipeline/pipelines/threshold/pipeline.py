"""Wiring of the ``threshold`` pipeline (see nodes.py). Run alone: ``kedro run --pipelines=threshold``."""

from kedro.pipeline import Pipeline, node

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
                nodes.sweep_val_thresholds,
                inputs=["val_probabilities", "split_manifest", "annotations", "params:threshold"],
                outputs={"sweep": "threshold_sweep", "curves": "threshold_sweep_curves"},
                name="sweep_val_thresholds",
            ),
            node(
                nodes.freeze_threshold,
                inputs=[
                    "threshold_sweep",
                    "val_probabilities",
                    "split_manifest",
                    "annotations",
                    "params:threshold",
                ],
                outputs={"threshold": "frozen_threshold", "metrics": "threshold_metrics"},
                name="freeze_threshold",
            ),
            node(
                nodes.plot_threshold_sweep,
                inputs=["threshold_sweep", "frozen_threshold"],
                outputs={"plot": "threshold_sweep_plot"},
                name="plot_threshold_sweep",
            ),
        ]
    )
