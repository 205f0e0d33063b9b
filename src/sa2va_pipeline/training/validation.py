"""Validation Dice during training: mean per-image Dice over a threshold grid, at its best threshold.

Only a monitor of training (the threshold pipeline chooses the real threshold, on the same split, with the
same library): probabilities come from ``model.predict_proba`` (the same path as inference), the sweep
from :func:`sa2va_pipeline.evaluation.threshold_sweep.sweep_thresholds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def validation_dice(
    model: Any,
    samples: Sequence[dict[str, Any]],
    thresholds: Sequence[float],
    batch_size: int = 4,
    predict_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict ``samples`` (dicts with ``image``, ``masks``, ``phrases``) and sweep the thresholds.

    Returns ``val_dice_best_threshold`` (mean per-image Dice at the best grid threshold),
    ``val_best_threshold``, ``val_dice_at_0.5``, ``val_dice_pooled_best_threshold`` and the mean-Dice
    curve under ``dice_per_threshold``.
    """
    from sa2va_pipeline.evaluation.threshold_sweep import sweep_thresholds

    if not samples:
        raise ValueError("Validation needs at least one sample; the val split is empty.")
    kwargs = {k: v for k, v in (predict_kwargs or {}).items() if v is not None}
    probs, truths = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        phrases = [s["phrases"][0] for s in batch]
        out = model.predict_proba([s["image"] for s in batch], phrases, batch_size=batch_size, **kwargs)
        out = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
        for sample, prob in zip(batch, out):
            probs.append(prob)
            masks = np.asarray(sample["masks"])
            truths.append(masks.reshape(-1, *masks.shape[-2:]).max(axis=0) > 0)
    grid = np.asarray(sorted(thresholds), dtype=np.float64)
    sweep, _ = sweep_thresholds(probs, truths, grid)
    mean_curve = sweep["dice_mean"].to_numpy()
    best = int(np.argmax(mean_curve))
    half = int(np.argmin(np.abs(grid - 0.5)))
    return {
        "val_dice_best_threshold": float(mean_curve[best]),
        "val_best_threshold": float(grid[best]),
        "val_dice_at_0.5": float(mean_curve[half]),
        "val_dice_pooled_best_threshold": float(sweep["dice_pooled"].max()),
        "dice_per_threshold": [float(v) for v in mean_curve],
    }
