"""Wiring of the ``external_evaluation`` pipeline: ``kedro run --pipelines=evaluation --params
external_dir=/other/data``. No training and no threshold choice here: ``frozen_threshold`` (chosen on the
original validation split) and the baseline's own frozen thresholds are inputs. Every output is an
``external_*`` entry, so nothing of the main dataset's outputs is written."""

from kedro.pipeline import Pipeline, node

from sa2va_pipeline.pipelines.annotation.nodes import build_annotations
from sa2va_pipeline.pipelines.ingestion.nodes import build_manifest

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Ingest + annotate the external folder (the project's code), predict, score, baseline, overlays."""
    return Pipeline(
        [
            node(
                nodes.ingest_external_data,
                inputs=["params:evaluation", "params:ingestion", "params:phrase", "params:split.group_regex",
                        "params:raw_dir", "trained_model", "frozen_threshold"],
                outputs={
                    "report": "external_ingestion_report",
                    "files": "external_ingested_samples",
                    "records": "external_ingestion_records",
                    "objects": "external_ingestion_planned_objects",
                    "metrics": "external_ingestion_metrics",
                },
                name="ingest_external_data",
            ),
            node(
                build_manifest,
                inputs=["external_ingestion_records", "external_ingestion_planned_objects",
                        "external_ingested_samples"],
                outputs={"manifest": "external_ingestion_manifest", "objects": "external_ingestion_objects"},
                name="build_external_manifest",
            ),
            node(
                build_annotations,
                inputs=["external_ingestion_manifest", "external_ingestion_objects", "params:annotation"],
                outputs={"annotations": "external_annotations", "report": "external_annotation_report",
                         "metrics": "external_annotation_metrics"},
                name="build_external_annotations",
            ),
            node(
                nodes.predict_external_probabilities,
                inputs=["trained_model", "external_ingestion_manifest", "external_annotations", "frozen_threshold",
                        "params:phrase", "params:prediction"],
                outputs="external_probabilities",
                name="predict_external_probabilities",
            ),
            node(
                nodes.score_external,
                inputs=["external_probabilities", "external_ingestion_manifest", "external_annotations",
                        "external_ingestion_report", "external_annotation_report", "frozen_threshold",
                        "params:evaluation"],
                outputs={"per_image": "external_evaluation_per_image", "summary": "external_sa2va_summary",
                         "metrics": "external_evaluation_metrics"},
                name="score_external",
            ),
            node(
                nodes.score_external_baseline,
                inputs=["baseline_model_stored", "baseline_frozen_threshold_stored", "external_ingestion_manifest",
                        "external_annotations", "external_evaluation_per_image", "params:evaluation",
                        "params:baseline"],
                outputs={"baseline": "external_baseline", "metrics": "external_baseline_metrics"},
                name="score_external_baseline",
            ),
            node(
                nodes.assemble_external_summary,
                inputs=["external_sa2va_summary", "external_baseline"],
                outputs="external_evaluation_summary",
                name="assemble_external_summary",
            ),
            node(
                nodes.draw_external_overlays,
                inputs=["external_probabilities", "external_evaluation_per_image", "external_ingestion_manifest",
                        "external_annotations", "frozen_threshold", "params:overlay"],
                outputs={"overlays": "external_evaluation_overlays", "grid": "external_evaluation_overlay_grid"},
                name="draw_external_overlays",
            ),
        ]
    )
