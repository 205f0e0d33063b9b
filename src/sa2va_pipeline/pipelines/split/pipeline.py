"""Wiring of the ``split`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import split_samples


def create_pipeline(**kwargs) -> Pipeline:
    """One node: manifest -> split manifest + split sizes."""
    return Pipeline(
        [
            node(
                split_samples,
                inputs=["ingestion_manifest", "params:split"],
                outputs=["split_manifest", "split_manifest_mlflow", "split_metrics"],
                name="split_samples",
            )
        ]
    )
