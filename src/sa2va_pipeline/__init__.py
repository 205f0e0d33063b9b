"""sa2va-pipeline: LoRA fine-tuning of Sa2VA for text-prompted segmentation, as a Kedro project."""

__version__ = "0.1.0"
