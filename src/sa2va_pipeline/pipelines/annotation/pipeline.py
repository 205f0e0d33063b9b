"""Wiring of the ``annotation`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import build_annotations


def create_pipeline(**kwargs) -> Pipeline:
    """One node: the ingested objects of every image -> annotations.json + per-object report + metrics."""
    return Pipeline(
        [
            node(
                build_annotations,
                inputs=["ingestion_manifest", "ingestion_objects", "params:annotation"],
                outputs={"annotations": "annotations", "report": "annotation_report", "metrics": "annotation_metrics"},
                name="build_annotations",
            )
        ]
    )
