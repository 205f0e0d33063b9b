"""Wiring of the ``training`` pipeline (see nodes.py). Run alone: ``kedro run --pipelines=training``."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One node: load the train/val frames, build and fine-tune the model, hand it to the catalog."""
    return Pipeline(
        [
            node(
                nodes.train_model,
                inputs=["split_manifest", "annotations", "params:training"],
                outputs={"model": "trained_model", "summary": "training_summary", "loss_curve": "training_loss_curve"},
                name="train_model",
            )
        ]
    )
