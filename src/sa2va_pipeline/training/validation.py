"""Validation Dice during training: mean per-image Dice over a threshold grid, at the best threshold.

Only a monitor for training (the threshold pipeline chooses the real threshold). The Dice formula and
its empty-mask conventions come from :mod:`sa2va_pipeline.evaluation.metrics`; the sweep here is a
small vectorised loop over thresholds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def dice_per_threshold(prob: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Dice of ``prob >= t`` against ``truth`` for every threshold ``t`` (same conventions as metrics.dice)."""
    from sa2va_pipeline.evaluation.metrics import ConfusionCounts, overlap_metrics

    prob = np.asarray(prob, dtype=np.float32)
    truth = np.asarray(truth).astype(bool)
    if prob.shape != truth.shape:
        raise ValueError(f"probability map shape {prob.shape} differs from mask shape {truth.shape}")
    p, t = prob.ravel(), truth.ravel()
    n_truth = int(t.sum())
    p_true = np.sort(p[t])
    p_all = np.sort(p)
    out = []
    for thr in thresholds:
        # counts of values >= thr via binary search on the sorted arrays
        tp = n_truth - int(np.searchsorted(p_true, thr, side="left"))
        n_pred = p.size - int(np.searchsorted(p_all, thr, side="left"))
        counts = ConfusionCounts(tp=tp, fp=n_pred - tp, fn=n_truth - tp, tn=p.size - n_pred - (n_truth - tp))
        out.append(overlap_metrics(counts)["dice"])
    return np.asarray(out, dtype=np.float64)


def sweep_dice(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float]
) -> dict[str, float | list[float]]:
    """Mean per-image Dice per threshold over (probability, mask) pairs and the best of them.

    Returns ``val_dice_best_threshold``, ``val_best_threshold``, ``val_dice_at_0.5`` (nearest grid point)
    and the whole curve under ``dice_per_threshold``.
    """
    rows = [dice_per_threshold(prob, mask, thresholds) for prob, mask in pairs]
    if not rows:
        raise ValueError("Validation needs at least one sample; the val split is empty.")
    curve = np.mean(np.stack(rows), axis=0)
    best = int(np.argmax(curve))
    half = int(np.argmin(np.abs(np.asarray(thresholds) - 0.5)))
    return {
        "val_dice_best_threshold": float(curve[best]),
        "val_best_threshold": float(thresholds[best]),
        "val_dice_at_0.5": float(curve[half]),
        "dice_per_threshold": [float(v) for v in curve],
    }
