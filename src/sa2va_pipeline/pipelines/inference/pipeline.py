"""Wiring of the ``inference`` pipeline (see nodes.py).

``kedro run --pipelines=inference --params input_dir=/path/to/images``
"""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Segment a folder of new images for every phrase at its frozen threshold."""
    return Pipeline(
        [
            node(
                nodes.segment_new_images,
                inputs=[
                    "trained_model",
                    "frozen_threshold",
                    "params:phrase",
                    "params:prediction",
                    "params:inference",
                    "params:overlay",
                ],
                outputs={
                    "outputs": "inference_outputs",
                    "report": "inference_report",
                    "grid": "inference_overlay_grid",
                    "metrics": "inference_metrics",
                },
                name="segment_new_images",
            )
        ]
    )
