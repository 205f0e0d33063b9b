"""Wiring of the ``sample_data`` pipeline."""

from kedro.pipeline import Pipeline, node

from .nodes import generate_sample_data


def create_pipeline(**kwargs) -> Pipeline:
    """One node: generate (or keep) the synthetic sample; its summary is a report, not an input of ingestion."""
    return Pipeline(
        [node(generate_sample_data, inputs="params:sample_data", outputs="sample_ready", name="generate_sample_data")]
    )
