"""``training`` pipeline: split manifest -> LoRA fine-tuned Sa2VA (+ summary, loss curve, MLflow logs)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
