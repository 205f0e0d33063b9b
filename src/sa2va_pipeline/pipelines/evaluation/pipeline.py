"""Wiring of the ``evaluation`` pipeline (see nodes.py): the same scoring nodes for ``val`` and ``test``.

Test metrics take ``frozen_threshold`` (chosen on val by the threshold pipeline) as an input: no node
here chooses a threshold.
"""

from functools import partial

from kedro.pipeline import Pipeline, node

from ..mlflow_copies import outputs_with_copies, with_mlflow_copies
from . import nodes

SPLITS = ("val", "test")


def create_pipeline(**kwargs) -> Pipeline:
    """Predict (or re-use) test maps per phrase; score val and test at the frozen thresholds; overlays."""
    steps = [
        node(
            nodes.predict_test_probabilities,
            inputs=[
                "trained_model",
                "split_manifest",
                "annotations",
                "test_probabilities_stored",
                "frozen_threshold",
                "params:phrase",
                "params:prediction",
            ],
            outputs="test_probabilities",
            name="predict_test_probabilities",
        )
    ]
    for split in SPLITS:
        steps += [
            node(
                with_mlflow_copies(partial(nodes.score_split, split=split), "per_image", "summary"),
                inputs=[
                    f"{split}_probabilities",
                    "split_manifest",
                    "annotations",
                    "frozen_threshold",
                    "params:evaluation",
                ],
                outputs=outputs_with_copies(
                    {
                        "per_image": f"evaluation_per_image_{split}",
                        "summary": f"evaluation_summary_{split}",
                        "metrics": f"evaluation_metrics_{split}",
                    },
                    "per_image",
                    "summary",
                ),
                name=f"score_{split}",
            ),
            node(
                with_mlflow_copies(partial(nodes.draw_overlays, split=split), "grid"),
                inputs=[
                    f"{split}_probabilities",
                    f"evaluation_per_image_{split}",
                    "split_manifest",
                    "annotations",
                    "frozen_threshold",
                    "params:overlay",
                ],
                outputs=outputs_with_copies(
                    {"overlays": f"evaluation_overlays_{split}", "grid": f"evaluation_overlay_grid_{split}"},
                    "grid",
                ),
                name=f"draw_{split}_overlays",
            ),
        ]
    return Pipeline(steps)
