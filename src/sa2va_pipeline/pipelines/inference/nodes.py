"""Nodes of the ``inference`` pipeline: segment every readable image of a folder at the frozen threshold.

The input folder is only read. Outputs go to a new version of the ``inference_outputs`` folder:
``masks/<stem>.png`` (0/255 binary), ``probabilities/<stem>.png`` (probability x 255, optional) and
``overlays/<stem>.png`` (prediction over the frame, legend strip below). Unreadable files are skipped and
named in the report CSV.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sa2va_pipeline.evaluation.new_images import output_names, read_image_folder, report_table
from sa2va_pipeline.evaluation.overlays import add_legend_strip, error_overlay, overlay_grid_figure
from sa2va_pipeline.evaluation.probabilities import (
    binarize,
    load_prediction_model,
    predict_probability_maps,
    quantise,
)

logger = logging.getLogger(__name__)


def segment_new_images(
    trained_model: Path,
    frozen_threshold: dict[str, Any],
    phrase: str,
    prediction: dict[str, Any],
    inference: dict[str, Any],
    overlay: dict[str, Any],
) -> dict[str, Any]:
    """Masks, probability maps and overlays for every readable image in ``inference.input_dir``.

    Returns ``outputs`` ({relative path: PNG bytes}), ``report`` (one row per input entry),
    ``grid`` (overlays of the first few images) and ``metrics`` (counts for MLflow).
    """
    from sa2va_pipeline.data.image_io import encode_png

    input_dir = Path(inference["input_dir"])
    threshold = inference.get("threshold")
    threshold = float(frozen_threshold["threshold"] if threshold is None else threshold)
    folder = read_image_folder(input_dir, inference.get("extensions") or ())
    for row in folder.report:
        if row["status"] != "ok":
            logger.warning("inference: skipping %s (%s) %s", row["file"], row["status"], row["message"])
    colors, alpha = overlay.get("colors"), float(overlay.get("alpha", 0.7))

    outputs: dict[str, bytes] = {}
    panels = []
    if folder.images:
        model = load_prediction_model(trained_model, prediction)
        samples = [{"id": name, "image": image, "phrases": [phrase]} for name, image in folder.images.items()]
        maps = predict_probability_maps(
            model.iter_predict_proba,
            samples,
            batch_size=int(prediction.get("batch_size", 8)),
            storage_dtype="float16",  # keep full precision here: these maps are written once, as PNGs
            prompt_kwargs={
                "question_template": prediction.get("question_template"),
                "answer": prediction.get("answer"),
            },
        )
        names = output_names(list(folder.images))
        by_file = {row["file"]: row for row in folder.report}
        for name, prob in maps.items():
            stem, mask = names[name], binarize(prob, threshold)
            outputs[f"masks/{stem}.png"] = encode_png(mask.astype(np.uint8) * 255)
            if inference.get("save_probabilities", True):
                outputs[f"probabilities/{stem}.png"] = encode_png(quantise(prob, "uint8"))
            drawn = error_overlay(folder.images[name], mask, None, colors, alpha)
            if inference.get("save_overlays", True):
                outputs[f"overlays/{stem}.png"] = encode_png(
                    add_legend_strip(drawn, colors, with_truth=False)
                )
            by_file[name].update(output_name=f"{stem}.png", foreground_fraction=float(mask.mean()))
            if len(panels) < int(inference.get("grid_images", 6)):
                panels.append({"overlay": drawn, "title": name})
    report = report_table(folder.report)
    n_ok = int((report["status"] == "ok").sum())
    logger.info(
        "inference: %d image(s) segmented at threshold %.2f, %d entr(ies) skipped",
        n_ok,
        threshold,
        len(report) - n_ok,
    )
    grid = overlay_grid_figure(
        panels, colors, with_truth=False, title=f"inference at threshold {threshold:.2f}: {input_dir.name}"
    )
    metrics = {"n_images": n_ok, "n_skipped": len(report) - n_ok, "threshold": threshold}
    return {
        "outputs": outputs,
        "report": report,
        "grid": grid,
        "metrics": {k: {"value": float(v), "step": 0} for k, v in metrics.items()},
    }
