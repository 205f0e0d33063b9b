"""Wiring of the ``inference`` pipeline (see nodes.py).

``kedro run --pipeline=inference --params input_dir=/path/to/images``
"""

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Segment a folder of new images for every phrase at its frozen threshold."""
    return Pipeline(
        [
            node(
                with_mlflow_copies(nodes.segment_new_images, "report", "grid"),
                inputs=[
                    "trained_model",
                    "frozen_threshold",
                    "params:phrase",
                    "params:prediction",
                    "params:inference",
                    "params:overlay",
                ],
                outputs=outputs_with_copies(
                    {
                        "outputs": "inference_outputs",
                        "report": "inference_report",
                        "grid": "inference_overlay_grid",
                        "metrics": "inference_metrics",
                    },
                    "report",
                    "grid",
                ),
                name="segment_new_images",
            )
        ]
    )
