"""Wiring of the ``split`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import split_samples


def create_pipeline(**kwargs) -> Pipeline:
    """One node: manifest + annotations -> split manifest + split sizes."""
    return Pipeline(
        [
            node(
                split_samples,
                inputs=["ingestion_manifest", "annotations", "params:split"],
                outputs={"manifest": "split_manifest", "metrics": "split_metrics"},
                name="split_samples",
            )
        ]
    )
