"""Node of the ``inference`` pipeline: segment every readable image of a folder for every phrase.

The input folder is only read (symlinks, files outside it and images above ``inference.max_pixels`` are
refused and reported). Outputs go to a new version of the ``inference_outputs`` folder; the layout is in
:mod:`sa2va_pipeline.inference.segment` (``masks/<phrase>/<stem>.png``, ...). A folder without any readable
image is an error raised before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sa2va_pipeline.evaluation.report import metric_key
from sa2va_pipeline.inference.folder import DEFAULT_MAX_PIXELS, read_image_folder
from sa2va_pipeline.inference.segment import (
    inference_grid,
    inference_phrases,
    inference_thresholds,
    segment_folder,
)
from sa2va_pipeline.prediction.model_loading import load_prediction_model

logger = logging.getLogger(__name__)


def segment_new_images(
    trained_model: Path,
    frozen_threshold: dict[str, Any],
    phrase: str,
    prediction: dict[str, Any],
    inference: dict[str, Any],
    overlay: dict[str, Any],
) -> dict[str, Any]:
    """Masks, probability maps and overlays per phrase for every readable image of ``inference.input_dir``.

    Returns ``outputs`` ({relative path: PNG bytes}), ``report`` (one row per input entry), ``grid`` (overlays
    of the first images) and ``metrics`` (counts for MLflow).
    """
    input_dir = Path(inference["input_dir"])
    max_pixels = int(inference.get("max_pixels") or DEFAULT_MAX_PIXELS)
    folder = read_image_folder(input_dir, inference.get("extensions"), max_pixels)
    phrases = inference_phrases(inference.get("phrases"), frozen_threshold, trained_model, phrase)
    thresholds = inference_thresholds(inference.get("threshold"), frozen_threshold, phrases)
    for row in (r for r in folder.report if r["status"] != "ok"):
        # hidden non-images (.DS_Store, the sample's .sa2va_synthetic.json marker) are reported, not warned about
        hidden = str(row["file"]).startswith(".") and row["status"] == "not_an_image"
        logger.log(logging.INFO if hidden else logging.WARNING, "inference: skipping %s (%s) %s", row["file"],
                   row["status"], row["message"])
    model = load_prediction_model(trained_model, prediction)
    result = segment_folder(model, folder, thresholds, prediction, inference, overlay)
    n_ok = len(folder.images)
    logger.info("inference: %d image(s) segmented for %s, %d entr(ies) skipped", n_ok,
                ", ".join(f"{p!r} at {t:.2f}" for p, t in thresholds.items()), len(folder.report) - n_ok)
    metrics = {"n_images": n_ok, "n_skipped": len(folder.report) - n_ok}
    metrics.update({f"{metric_key(p)}.threshold": t for p, t in thresholds.items()})
    return {
        "outputs": result.outputs,
        "report": result.report,
        "grid": inference_grid(result, inference, title=f"inference: {input_dir.name}"),
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()},
    }
