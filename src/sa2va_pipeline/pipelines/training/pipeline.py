"""Wiring of the ``training`` pipeline (see nodes.py). Run alone: ``kedro run --pipeline=training``."""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One node: load the train/val frames, build and fine-tune the model, hand it to the catalog."""
    return Pipeline(
        [
            node(
                with_mlflow_copies(nodes.train_model, "model", "summary", "loss_curve"),
                inputs=["split_manifest", "annotations", "params:training"],
                outputs=outputs_with_copies(
                    {"model": "trained_model", "summary": "training_summary", "loss_curve": "training_loss_curve"},
                    "model", "summary", "loss_curve",
                ),
                name="train_model",
            )
        ]
    )
