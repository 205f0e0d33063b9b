"""Wiring of the ``evaluation`` pipeline (see nodes.py): the same scoring nodes for ``val`` and ``test``.

Test metrics take ``frozen_threshold`` (chosen on val by the threshold pipeline) as an input: no node
here chooses a threshold.
"""

from kedro.pipeline import Pipeline, node

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
                getattr(nodes, f"score_{split}"),
                inputs=[
                    f"{split}_probabilities",
                    "split_manifest",
                    "annotations",
                    "frozen_threshold",
                    "params:evaluation",
                ],
                outputs={
                    "per_image": f"evaluation_per_image_{split}",
                    "summary": f"evaluation_summary_{split}",
                    "metrics": f"evaluation_metrics_{split}",
                },
                name=f"score_{split}",
            ),
            node(
                getattr(nodes, f"draw_{split}_overlays"),
                inputs=[
                    f"{split}_probabilities",
                    f"evaluation_per_image_{split}",
                    "split_manifest",
                    "annotations",
                    "frozen_threshold",
                    "params:overlay",
                ],
                outputs={"overlays": f"evaluation_overlays_{split}", "grid": f"evaluation_overlay_grid_{split}"},
                name=f"draw_{split}_overlays",
            ),
        ]
    return Pipeline(steps)
