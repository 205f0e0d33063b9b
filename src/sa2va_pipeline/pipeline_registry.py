"""Registers the project's pipelines; ``__default__`` runs the whole chain.

Each stage is a namespaced modular pipeline (namespace = its name), so Kedro-Viz draws it as one box that
expands on click and ``kedro run --namespaces=<stage>`` selects it. Dataset and parameter names are NOT
prefixed with the namespace: catalog entries and the names stages share stay as they are.
"""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The order in which the default run chains the stages (Kedro resolves the real order from the data).
CHAIN = ["sample_data", "ingestion", "annotation", "split", "training", "threshold", "evaluation", "inference"]


def register_pipelines() -> dict[str, Pipeline]:
    """Find every pipeline under ``pipelines/``, namespace each by its name, add ``__default__``."""
    pipelines = {
        name: Pipeline(pipe, namespace=name, prefix_datasets_with_namespace=False)
        for name, pipe in find_pipelines(raise_errors=True).items()
    }
    pipelines["__default__"] = sum((pipelines[name] for name in CHAIN if name in pipelines), Pipeline([]))
    return pipelines
