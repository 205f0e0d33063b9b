"""Segment the images of a folder for every phrase at its threshold; masks, probabilities and overlays as PNG.

Output layout (relative paths of one ``inference_outputs`` version; ``<phrase>`` is the phrase's folder name
from :func:`~sa2va_pipeline.prediction.maps.phrase_file_names`, e.g. ``blood_vessel``)::

    masks/<phrase>/<stem>.png          0/255 binary mask of that phrase
    probabilities/<phrase>/<stem>.png  probability x 255 (inference.save_probabilities)
    overlays/<stem>.png                every phrase in its own colour over the frame, legend strip below,
                                       the raw frame beside it with overlay.show_raw (inference.save_overlays)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.evaluation.frozen_threshold import record_phrases, thresholds_by_phrase
from sa2va_pipeline.evaluation.overlays import (
    add_legend_strip,
    beside_raw,
    grid_panels,
    overlay_grid_figure,
    phrase_colors,
    phrase_legend_entries,
    phrase_overlay,
)
from sa2va_pipeline.prediction.engine import iter_maps
from sa2va_pipeline.prediction.maps import binarize, dequantise, phrase_file_names, quantise
from sa2va_pipeline.prediction.model_loading import model_phrases
from sa2va_pipeline.prediction.stored import prompt_settings

from .folder import ImageFolder, output_names, report_table

ENCODE_THREADS = 16  # at most; one per CPU core below that


@dataclass
class Segmentation:
    """What one inference run produced: files, the report, grid panels and the legend."""

    outputs: dict[str, bytes] = field(default_factory=dict)
    report: pd.DataFrame | None = None
    panels: list[dict[str, Any]] = field(default_factory=list)
    legend: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)


def inference_phrases(
    requested: Sequence[str] | str | None,
    frozen_threshold: Mapping[str, Any],
    model_dir: str | Path,
    fallback: str,
) -> list[str]:
    """The phrases to segment: ``inference.phrases`` if set, else the trained phrases (recorded in the frozen
    threshold, else in the model folder), else the ``phrase`` parameter (single-phrase models)."""
    from sa2va_pipeline.model.prompts import clean_phrase

    if requested:
        chosen = [requested] if isinstance(requested, str) else list(requested)
    else:
        chosen = record_phrases(frozen_threshold) or model_phrases(model_dir) or [fallback]
    return list(dict.fromkeys(clean_phrase(p) for p in chosen))


def inference_thresholds(
    override: float | Mapping[str, float] | None, frozen_threshold: Mapping[str, Any], phrases: Sequence[str]
) -> dict[str, float]:
    """Each phrase's threshold: ``inference.threshold`` (one number for all, or ``{phrase: number}``) where
    given, else the frozen one (MissingThresholdError naming a phrase that has neither)."""
    if isinstance(override, (int, float)):
        return {p: float(override) for p in phrases}
    given = {str(k): float(v) for k, v in (override or {}).items()}
    rest = [p for p in phrases if p not in given]
    frozen = thresholds_by_phrase(frozen_threshold, rest) if rest else {}
    return {p: given.get(p, frozen.get(p)) for p in phrases}


def _draw(
    image: np.ndarray, masks: dict[str, np.ndarray], colors: dict, overlay: Mapping[str, Any]
) -> np.ndarray:
    drawn = phrase_overlay(image, masks, colors, float(overlay.get("alpha", 0.7)))
    return beside_raw(image, drawn) if overlay.get("show_raw", True) else drawn


@dataclass
class _ImageOutputs:
    """What one image adds to a :class:`Segmentation` (encoded in a worker thread)."""

    files: dict[str, bytes]
    fractions: dict[str, float]
    drawn: np.ndarray | None  # the overlay without legend, kept only for the grid's panels


def _image_outputs(
    image: np.ndarray,
    stem: str,
    probabilities: dict[str, np.ndarray],
    thresholds: Mapping[str, float],
    folders: dict[str, str],
    colors: dict,
    legend: list,
    options: Mapping[str, Any],
    overlay: Mapping[str, Any],
    keep_drawn: bool,
) -> _ImageOutputs:
    """Masks, probability PNGs and the overlay of one image (PNG encoding releases the GIL: a thread pool
    runs this for many images at once; the overlay's PNG alone takes ~40 ms for a 512 frame)."""
    from sa2va_pipeline.data.image_io import encode_png

    files: dict[str, bytes] = {}
    masks, fractions = {}, {}
    for phrase, prob in probabilities.items():
        masks[phrase] = binarize(prob, thresholds[phrase])
        files[f"masks/{folders[phrase]}/{stem}.png"] = encode_png(masks[phrase].astype(np.uint8) * 255)
        if options.get("save_probabilities", True):
            files[f"probabilities/{folders[phrase]}/{stem}.png"] = encode_png(quantise(prob, "uint8"))
        fractions[f"foreground_fraction.{phrase}"] = float(masks[phrase].mean())
    drawn = None
    if options.get("save_overlays", True) or keep_drawn:
        drawn = _draw(image, masks, colors, overlay)
    if options.get("save_overlays", True):
        files[f"overlays/{stem}.png"] = encode_png(add_legend_strip(drawn, entries=legend))
    return _ImageOutputs(files, fractions, drawn if keep_drawn else None)


def segment_folder(
    model: Any,
    folder: ImageFolder,
    thresholds: Mapping[str, float],
    prediction: Mapping[str, Any],
    options: Mapping[str, Any],
    overlay: Mapping[str, Any],
) -> Segmentation:
    """Predict every phrase of ``thresholds`` on every image of ``folder``; encode the outputs (module doc).

    ``options`` are the ``inference`` parameters (``save_probabilities``, ``save_overlays``, ``grid_images``),
    ``overlay`` the shared overlay parameters (``alpha``, ``phrase_palette``, ``show_raw``). A thread pool
    encodes each image's outputs as soon as its maps arrive (the GPU predicts the next images meanwhile); they
    are collected in the folder's order.
    """
    phrases = list(thresholds)
    samples = [{"id": name, "image": image} for name, image in folder.images.items()]
    prompt = prompt_settings(prediction)
    folders, stems = phrase_file_names(phrases), output_names(list(folder.images))
    colors = phrase_colors(phrases, overlay.get("phrase_palette"))
    result = Segmentation(legend=phrase_legend_entries(colors))
    rows = {row["file"]: row for row in folder.report}
    n_panels = int(options.get("grid_images", 6))  # keep only what the grid shows

    def outputs(index: int, name: str, probabilities: dict[str, np.ndarray]) -> _ImageOutputs:
        return _image_outputs(folder.images[name], stems[name], probabilities, thresholds, folders, colors,
                              result.legend, options, overlay, index < n_panels)  # fmt: skip

    with ThreadPoolExecutor(max(1, min(ENCODE_THREADS, os.cpu_count() or 1))) as pool:
        # an image's outputs are encoded as soon as its maps arrive, while later images are predicted
        encoded, maps = [], {}
        batch_size = int(prediction.get("batch_size", 8))
        # float16 keeps full precision here: these maps are written once, as PNGs, not stored for re-use
        for (name, phrase), stored in iter_maps(model, samples, phrases, batch_size, "float16", prompt):
            maps[phrase] = dequantise(stored)
            if len(maps) == len(phrases):  # the engine gives all phrases of an image together
                encoded.append(pool.submit(outputs, len(encoded), name, maps))
                maps = {}
        for name, future in zip(folder.images, encoded):
            done = future.result()
            result.outputs.update(done.files)
            rows[name].update(done.fractions)
            rows[name]["output_name"] = f"{stems[name]}.png"
            if done.drawn is not None:
                result.panels.append({"overlay": done.drawn, "title": name})
    result.report = report_table(folder.report)
    return result


def inference_grid(result: Segmentation, options: Mapping[str, Any], title: str) -> Any:
    """The grid figure of the first overlays, in full rows (no blank cell), with the phrase legend."""
    columns = int(options.get("grid_columns", 3))
    n = grid_panels(len(result.panels), int(options.get("grid_images", 6)), columns)
    return overlay_grid_figure(result.panels[:n], title=title, columns=columns, entries=result.legend)
