"""Registers the project's pipelines; ``__default__`` runs the whole chain."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The order in which the default run chains the stages (Kedro resolves the real order from the data).
CHAIN = ["sample_data", "ingestion", "annotation", "split", "training", "threshold", "evaluation", "inference"]


def register_pipelines() -> dict[str, Pipeline]:
    """Find every pipeline under ``pipelines/`` and add ``__default__`` (the whole chain)."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum((pipelines[name] for name in CHAIN if name in pipelines), Pipeline([]))
    return pipelines
