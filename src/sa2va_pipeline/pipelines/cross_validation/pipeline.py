"""Wiring of the ``cross_validation`` pipeline: ``kedro run --pipelines=cross_validation`` (after a run that made
the split manifest and annotations). Not part of the default run: it trains one model per fold."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One node: every fold is trained, thresholded on its validation part and scored inside it."""
    return Pipeline(
        [
            node(
                nodes.cross_validate,
                inputs=[
                    "split_manifest",
                    "annotations",
                    "params:cross_validation",
                    "params:training",
                    "params:threshold",
                    "params:evaluation",
                    "params:prediction",
                    "params:baseline",
                ],
                outputs={
                    "summary": "cross_validation_summary",
                    "table": "cross_validation_folds_table",
                    "per_image": "cross_validation_per_image",
                    "figure": "cross_validation_figure",
                    "folds": "cross_validation_folds",
                    "metrics": "cross_validation_metrics",
                },
                name="cross_validate",
            )
        ]
    )
