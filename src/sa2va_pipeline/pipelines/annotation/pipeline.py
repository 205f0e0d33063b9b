"""Wiring of the ``annotation`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import build_annotations


def create_pipeline(**kwargs) -> Pipeline:
    """One node: manifest masks -> annotations.json + round-trip report + metrics."""
    return Pipeline(
        [
            node(
                build_annotations,
                inputs=["ingestion_manifest", "params:phrase", "params:annotation"],
                outputs=["annotations", "annotation_report", "annotation_report_mlflow", "annotation_metrics"],
                name="build_annotations",
            )
        ]
    )
