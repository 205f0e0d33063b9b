"""Wiring of the ``ingestion`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import build_manifest, ingest_raw_data


def create_pipeline(**kwargs) -> Pipeline:
    """Check + normalise raw files and read their objects, then write the manifest and objects pointing at
    the saved normalised files. Needs no other pipeline: the synthetic sample is generated here when
    ``raw_dir`` is its folder."""
    return Pipeline(
        [
            node(
                ingest_raw_data,
                inputs=["params:raw_dir", "params:ingestion", "params:phrase", "params:split.group_regex",
                        "params:sample_data"],
                outputs={
                    "report": "ingestion_report",
                    "files": "ingested_samples",
                    "records": "ingestion_records",
                    "objects": "ingestion_planned_objects",
                    "metrics": "ingestion_metrics",
                },
                name="ingest_raw_data",
            ),
            node(
                build_manifest,
                inputs=["ingestion_records", "ingestion_planned_objects", "ingested_samples"],
                outputs={"manifest": "ingestion_manifest", "objects": "ingestion_objects"},
                name="build_manifest",
            ),
        ]
    )
