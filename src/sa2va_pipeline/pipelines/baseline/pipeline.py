"""Wiring of the ``baseline`` pipeline: ``kedro run --pipelines=baseline`` (after a run that made the split and
scored Sa2VA, e.g. the default ``kedro run``). Not part of the default run."""

from kedro.pipeline import Pipeline, node

from . import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Train the DynUNet on train, predict val/test, freeze thresholds on val, score test, compare to Sa2VA, and
    write the test summary.json again with the baseline beside Sa2VA."""
    return Pipeline(
        [
            node(
                nodes.train_baseline,
                inputs=["split_manifest", "annotations", "params:baseline"],
                outputs={"model": "baseline_model", "summary": "baseline_training_summary"},
                name="train_baseline",
            ),
            node(
                nodes.predict_baseline_maps,
                inputs=["baseline_model", "split_manifest", "annotations", "params:baseline"],
                outputs={"val": "baseline_val_probabilities", "test": "baseline_test_probabilities"},
                name="predict_baseline_maps",
            ),
            node(
                nodes.choose_baseline_thresholds,
                inputs=["baseline_val_probabilities", "split_manifest", "annotations", "params:threshold"],
                outputs="baseline_frozen_threshold",
                name="choose_baseline_thresholds",
            ),
            node(
                nodes.score_baseline,
                inputs=[
                    "baseline_test_probabilities",
                    "split_manifest",
                    "annotations",
                    "baseline_frozen_threshold",
                    "params:evaluation",
                ],
                outputs={
                    "per_image": "baseline_per_image",
                    "summary": "baseline_summary",
                    "metrics": "baseline_metrics",
                },
                name="score_baseline",
            ),
            node(
                nodes.compare_with_sa2va,
                inputs=[
                    "baseline_per_image",
                    "evaluation_per_image_test",
                    "split_manifest",
                    "params:evaluation",
                ],
                outputs={"comparison": "baseline_comparison", "metrics": "baseline_comparison_metrics"},
                name="compare_baseline_with_sa2va",
            ),
            node(
                nodes.add_baseline_block,
                inputs=["evaluation_summary_test", "baseline_summary", "baseline_comparison"],
                outputs="evaluation_summary_test_with_baseline",
                name="add_baseline_to_test_summary",
            ),
        ]
    )
