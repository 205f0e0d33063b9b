"""Wiring of the ``split`` pipeline."""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from .nodes import split_samples


def create_pipeline(**kwargs) -> Pipeline:
    """One node: manifest + annotations -> split manifest + split sizes."""
    return Pipeline(
        [
            node(
                with_mlflow_copies(split_samples, "manifest"),
                inputs=["ingestion_manifest", "annotations", "params:split"],
                outputs=outputs_with_copies({"manifest": "split_manifest", "metrics": "split_metrics"}, "manifest"),
                name="split_samples",
            )
        ]
    )
