"""Wiring of the ``annotation`` pipeline."""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from .nodes import build_annotations


def create_pipeline(**kwargs) -> Pipeline:
    """One node: the ingested objects of every image -> annotations.json + per-object report + metrics."""
    return Pipeline(
        [
            node(
                with_mlflow_copies(build_annotations, "report"),
                inputs=["ingestion_manifest", "ingestion_objects", "params:annotation"],
                outputs=outputs_with_copies(
                    {"annotations": "annotations", "report": "annotation_report", "metrics": "annotation_metrics"},
                    "report",
                ),
                name="build_annotations",
            )
        ]
    )
