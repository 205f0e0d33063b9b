"""The evaluation overlays: per phrase, the best, median and worst frame by Dice, drawn TP/FP/FN."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from sa2va_pipeline.data.samples import phrase_truth
from sa2va_pipeline.prediction.maps import ProbabilityMaps, binarize, phrase_file_names

from .overlays import add_legend_strip, beside_raw, error_overlay, overlay_grid_figure, pick_best_median_worst


def picks_per_phrase(per_image: pd.DataFrame, phrases: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{phrase: {"best"|"median"|"worst": id}}`` by each phrase's per-image Dice (``per_image`` rows)."""
    picks = {}
    for phrase in phrases:
        rows = per_image[per_image["phrase"].astype(str) == phrase]
        picks[phrase] = pick_best_median_worst(dict(zip(rows["id"].astype(str), rows["dice"])))
    return picks


def evaluation_overlays(
    maps: ProbabilityMaps,
    per_image: pd.DataFrame,
    load: Callable[[list[str]], list[dict[str, Any]]],
    thresholds: Mapping[str, float],
    overlay: Mapping[str, Any],
    title: str,
) -> tuple[dict[str, bytes], Any]:
    """Overlay PNGs ``<phrase>/<rank>_<id>.png`` (raw frame beside with ``overlay.show_raw``, legend strip
    below) and a grid figure (one row per phrase: best, median, worst).

    Args:
        maps: the split's probability maps; ``per_image``: its per-image table (``id``, ``phrase``, ``dice``).
        load: loads the samples of the given ids (their ground truth comes from annotations.json).
        thresholds: ``{phrase: frozen threshold}``; ``overlay``: the shared overlay parameters.
        title: the grid's title.
    """
    from sa2va_pipeline.data.image_io import encode_png

    colors, alpha = overlay.get("colors"), float(overlay.get("alpha", 0.7))
    picks = picks_per_phrase(per_image, list(thresholds))
    samples = {s["id"]: s for s in load(sorted({i for p in picks.values() for i in p.values()}))}
    dice = {(str(r.id), str(r.phrase)): r.dice for r in per_image.itertuples(index=False)}
    folders = phrase_file_names(list(thresholds))
    files: dict[str, bytes] = {}
    panels = []
    for phrase, ranked in picks.items():
        for rank, sample_id in ranked.items():
            sample = samples[sample_id]
            pred = binarize(maps.probabilities(sample_id, phrase), thresholds[phrase])
            drawn = error_overlay(sample["image"], pred, phrase_truth(sample, phrase), colors, alpha)
            if overlay.get("show_raw", True):
                drawn = beside_raw(sample["image"], drawn)
            files[f"{folders[phrase]}/{rank}_{sample_id}.png"] = encode_png(add_legend_strip(drawn, colors))
            score = f"Dice {dice[(sample_id, phrase)]:.3f} at {thresholds[phrase]:.2f}"
            panels.append({"overlay": drawn, "title": f"{phrase}, {rank}: {sample_id}\n{score}"})
    return files, overlay_grid_figure(panels, colors, title=title, columns=3)
