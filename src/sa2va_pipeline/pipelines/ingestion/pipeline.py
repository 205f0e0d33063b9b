"""Wiring of the ``ingestion`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import build_manifest, ingest_raw_data


def create_pipeline(**kwargs) -> Pipeline:
    """Check + normalise raw files, then write the manifest pointing at the saved normalised files."""
    return Pipeline(
        [
            node(
                ingest_raw_data,
                inputs=["sample_ready", "params:raw_dir", "params:ingestion", "params:split.group_regex"],
                outputs=[
                    "ingestion_report", "ingestion_report_mlflow", "ingested_samples", "ingestion_records",
                    "ingestion_metrics",
                ],
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
