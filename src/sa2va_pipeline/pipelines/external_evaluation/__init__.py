"""``external_evaluation``: a trained model (and the baseline) scored on another dataset at the frozen thresholds.

Run it as ``kedro run --pipelines=evaluation --params external_dir=/other/data`` (the project's session runs
this pipeline in place of ``evaluation`` when ``evaluation.external_dir`` is set) or by its own name."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
