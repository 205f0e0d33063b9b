"""Wiring of the ``training`` pipeline (see nodes.py). Run alone: ``kedro run --pipeline=training``."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One node: load the train/val frames, build and fine-tune the model, hand it to the catalog."""
    return Pipeline(
        [
            node(
                nodes.train_model,
                inputs=["split_manifest", "params:phrase", "params:training"],
                outputs={
                    "model": "trained_model",
                    "model_mlflow": "trained_model_mlflow",
                    "summary": "training_summary",
                    "summary_mlflow": "training_summary_mlflow",
                    "loss_curve": "training_loss_curve",
                    "loss_curve_mlflow": "training_loss_curve_mlflow",
                },
                name="train_model",
            )
        ]
    )
