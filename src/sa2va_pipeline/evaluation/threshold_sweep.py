"""Choosing one global probability threshold on validation data, for every threshold at once.

A pixel is foreground when ``probability >= threshold``. For each image the foreground and background
probabilities are binned by the threshold grid itself (``numpy.searchsorted``; one bin per grid interval),
and reverse cumulative sums of the two histograms give TP/FP/FN/TN at every threshold in one pass; the
counts are exact for the grid, not approximated. Pooled curves sum the counts over images; per-image Dice
curves come from the same per-image counts. A validation set of 200 frames of 512x512 takes seconds.

Objectives: ``pooled_dice`` (Dice over all pixels of all images, dominated by vessel-rich frames) or
``mean_dice`` (mean of per-image Dice, every frame weighs the same). Ties (a plateau of equal scores)
are broken by taking the middle of the tied thresholds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

OBJECTIVES: dict[str, str] = {"pooled_dice": "dice_pooled", "mean_dice": "dice_mean"}


def threshold_grid(start: float = 0.05, stop: float = 0.95, step: float = 0.01) -> np.ndarray:
    """Thresholds ``start, start + step, ..., stop`` (inclusive), rounded to kill float drift."""
    if not 0.0 <= start <= stop <= 1.0 or step <= 0:
        raise ValueError(
            f"need 0 <= start <= stop <= 1 and step > 0; got start={start}, stop={stop}, step={step}"
        )
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return np.round(start + step * np.arange(n), 10)


def threshold_counts(
    probabilities: np.ndarray, truth: np.ndarray, thresholds: np.ndarray
) -> dict[str, np.ndarray]:
    """TP, FP, FN, TN (int64 arrays of len(thresholds)) of one image at every threshold.

    ``thresholds`` must be increasing; ``truth`` is a 2-D mask (non-zero = foreground).
    """
    prob = np.asarray(probabilities, dtype=np.float32).ravel()
    fg = np.asarray(truth).astype(bool, copy=False).ravel()
    if prob.shape != fg.shape:
        raise ValueError(f"probability map size {prob.size} differs from mask size {fg.size}")
    k = len(thresholds)
    # bin b holds pixels with exactly b thresholds <= p, so p >= thresholds[j] <=> bin > j.
    bins = np.searchsorted(np.asarray(thresholds, dtype=np.float32), prob, side="right")
    hist_fg = np.bincount(bins[fg], minlength=k + 1)
    hist_bg = np.bincount(bins[~fg], minlength=k + 1)
    above_fg = np.cumsum(hist_fg[::-1])[::-1][1:]  # pixels with bin >= j + 1
    above_bg = np.cumsum(hist_bg[::-1])[::-1][1:]
    n_fg, n_bg = int(hist_fg.sum()), int(hist_bg.sum())
    return {"tp": above_fg, "fp": above_bg, "fn": n_fg - above_fg, "tn": n_bg - above_bg}


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Dice from confusion counts (arrays or scalars); 1 where both masks are empty (as metrics.py)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def _safe_ratio(num: np.ndarray, den: np.ndarray, both_empty: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), np.where(both_empty, 1.0, 0.0))


def sweep_thresholds(
    probabilities: Mapping[str, np.ndarray] | Iterable[np.ndarray],
    truths: Mapping[str, np.ndarray] | Iterable[np.ndarray],
    thresholds: np.ndarray,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sweep every threshold over a set of images.

    Args:
        probabilities: per-image probability maps (mapping id -> HxW, or a sequence aligned with truths).
        truths: per-image ground-truth masks, same keys/order.
        thresholds: increasing threshold grid (see :func:`threshold_grid`).

    Returns:
        ``(sweep, per_image_dice)``: ``sweep`` has one row per threshold with pooled Dice, IoU, precision
        and recall, the mean and SD of per-image Dice, and summed counts; ``per_image_dice`` is an
        images x thresholds table of per-image Dice (index: image id, columns: thresholds).
    """
    if isinstance(probabilities, Mapping):
        ids = list(probabilities)
        if not isinstance(truths, Mapping) or set(truths) != set(ids):
            raise ValueError("probabilities and truths must have the same image ids")
        probs_list = [probabilities[i] for i in ids]
        truth_list = [truths[i] for i in ids]
    else:
        probs_list, truth_list = list(probabilities), list(truths)
        ids = [str(i) for i in range(len(probs_list))]
    if not probs_list:
        raise ValueError("cannot sweep thresholds over zero images")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be strictly increasing")

    totals = {key: np.zeros(len(thresholds), dtype=np.int64) for key in ("tp", "fp", "fn", "tn")}
    per_image = np.empty((len(ids), len(thresholds)), dtype=np.float64)
    for row, (prob, truth) in enumerate(zip(probs_list, truth_list)):
        counts = threshold_counts(prob, truth, thresholds)
        for key in totals:
            totals[key] += counts[key]
        per_image[row] = dice_from_counts(counts["tp"], counts["fp"], counts["fn"])

    tp, fp, fn = (totals[k].astype(np.float64) for k in ("tp", "fp", "fn"))
    both_empty = (tp + fp + fn) == 0
    sweep = pd.DataFrame(
        {
            "threshold": thresholds,
            "dice_pooled": dice_from_counts(tp, fp, fn),
            "iou_pooled": _safe_ratio(tp, tp + fp + fn, both_empty),
            "precision_pooled": _safe_ratio(tp, tp + fp, both_empty),
            "recall_pooled": _safe_ratio(tp, tp + fn, both_empty),
            "dice_mean": per_image.mean(axis=0),
            "dice_sd": per_image.std(axis=0, ddof=1) if len(ids) > 1 else np.zeros(len(thresholds)),
            "tp": totals["tp"],
            "fp": totals["fp"],
            "fn": totals["fn"],
            "tn": totals["tn"],
        }
    )
    per_image_dice = pd.DataFrame(per_image, index=pd.Index(ids, name="id"), columns=thresholds)
    return sweep, per_image_dice


def best_index(scores: np.ndarray, atol: float = 1e-12) -> int:
    """Index of the best score; ties (a plateau of equal scores) go to the middle of the tied positions.

    The one tie-break rule of the project: the threshold pipeline, the per-image oracle and training's
    validation all choose with it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    best = np.flatnonzero(scores >= np.nanmax(scores) - atol)
    return int(best[len(best) // 2])


def choose_threshold(sweep: pd.DataFrame, objective: str = "pooled_dice") -> dict[str, float | str]:
    """Pick the threshold that maximises ``objective`` (``pooled_dice`` or ``mean_dice``) in a sweep table.

    Returns ``{"threshold", "objective", "score"}`` plus pooled and mean Dice at that threshold.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    column = OBJECTIVES[objective]
    index = best_index(sweep[column].to_numpy())
    row = sweep.iloc[index]
    return {
        "threshold": float(row["threshold"]),
        "objective": objective,
        "score": float(row[column]),
        "dice_pooled": float(row["dice_pooled"]),
        "dice_mean": float(row["dice_mean"]),
        "precision_pooled": float(row["precision_pooled"]),
        "recall_pooled": float(row["recall_pooled"]),
    }


def oracle_thresholds(per_image_dice: pd.DataFrame) -> pd.DataFrame:
    """Each image's best threshold and its Dice: an upper bound that no deployable method reaches.

    Returns a table indexed by image id with columns ``oracle_threshold`` and ``oracle_dice``.
    """
    values = per_image_dice.to_numpy()
    thresholds = np.asarray(per_image_dice.columns, dtype=np.float64)
    best = np.array([best_index(r) for r in values], dtype=int)
    return pd.DataFrame(
        {"oracle_threshold": thresholds[best], "oracle_dice": values[np.arange(len(values)), best]},
        index=per_image_dice.index,
    )
