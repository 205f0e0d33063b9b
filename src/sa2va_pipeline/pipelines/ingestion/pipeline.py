"""Wiring of the ``ingestion`` pipeline."""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from .nodes import build_manifest, ingest_raw_data


def create_pipeline(**kwargs) -> Pipeline:
    """Check + normalise raw files, then write the manifest pointing at the saved normalised files."""
    return Pipeline(
        [
            node(
                with_mlflow_copies(ingest_raw_data, "report"),
                inputs=["sample_ready", "params:raw_dir", "params:ingestion", "params:split.group_regex"],
                outputs=outputs_with_copies(
                    {
                        "report": "ingestion_report",
                        "files": "ingested_samples",
                        "records": "ingestion_records",
                        "metrics": "ingestion_metrics",
                    },
                    "report",
                ),
                name="ingest_raw_data",
            ),
            node(
                build_manifest,
                inputs=["ingestion_records", "ingested_samples"],
                outputs="ingestion_manifest",
                name="build_manifest",
            ),
        ]
    )
