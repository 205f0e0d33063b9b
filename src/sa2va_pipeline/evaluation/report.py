"""Per-image metric tables and the nnU-Net-style ``summary.json`` of one split.

The summary reports, at the frozen threshold and again at 0.5: per-image mean +- SD (sample SD,
ddof 1) of every metric, pooled values (counts summed over all images, then the ratio), and the mean
Dice of each image's own best threshold, labelled as an upper bound (it peeks at the test labels).
HD95 is NaN where exactly one mask is empty: means skip those images and ``n_undefined`` counts them.
NaN is written to JSON as ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .metrics import METRIC_NAMES, image_metrics, pooled_metrics
from .probabilities import ProbabilityMaps, binarize
from .threshold_sweep import oracle_thresholds, sweep_thresholds

CONVENTIONS: dict[str, str] = {
    "foreground": "probability >= threshold",
    "both_empty": "Dice, IoU, precision, recall, clDice = 1; HD95 = 0",
    "zero_denominator": "otherwise 0 (e.g. precision of an empty prediction on a frame with vessels)",
    "hd95": "symmetric 95th percentile of surface distances in pixels, medpy.metric.binary.hd95 definition "
    "(scipy binary_erosion surface + distance_transform_edt); NaN when exactly one mask is empty, excluded "
    "from the mean and counted in n_undefined",
    "cldice": "Shit et al. 2021 with skimage.morphology.skeletonize",
    "sd": "sample standard deviation over images (ddof=1)",
    "pooled": "confusion/skeleton counts summed over images, then the ratio",
    "oracle": "per-image best threshold on the sweep grid: an upper bound, not a result",
}


def per_image_metrics(
    probabilities: ProbabilityMaps,
    truths: Mapping[str, np.ndarray],
    threshold: float,
    hd_percentile: float = 95.0,
) -> pd.DataFrame:
    """One row per image: metrics and counts at ``threshold`` (columns ``id, threshold, dice, ...``)."""
    missing = [i for i in probabilities.ids() if i not in truths]
    if missing:
        raise ValueError(f"no ground-truth mask for {len(missing)} image(s), e.g. {missing[:3]}")
    rows = []
    for sample_id, prob in probabilities.items():
        truth = np.asarray(truths[sample_id])
        if truth.shape != prob.shape:
            raise ValueError(
                f"sample {sample_id}: mask shape {truth.shape} differs from probability map {prob.shape}"
            )
        row: dict[str, Any] = {"id": sample_id, "threshold": float(threshold)}
        row.update(image_metrics(binarize(prob, threshold), truth, hd_percentile))
        rows.append(row)
    return pd.DataFrame(rows)


def _describe(values: pd.Series) -> dict[str, Any]:
    finite = values.dropna().to_numpy(dtype=np.float64)
    n = len(finite)
    return {
        "mean": float(finite.mean()) if n else None,
        "sd": float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else None),
        "median": float(np.median(finite)) if n else None,
        "n": n,
        "n_undefined": int(len(values) - n),
    }


def _block(table: pd.DataFrame) -> dict[str, Any]:
    return {
        "threshold": float(table["threshold"].iloc[0]),
        "mean": {m: _describe(table[m]) for m in METRIC_NAMES},
        "pooled": pooled_metrics(table.to_dict("records")),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate_split(
    probabilities: ProbabilityMaps,
    truths: Mapping[str, np.ndarray],
    threshold: float,
    oracle_grid: np.ndarray,
    split: str,
    hd_percentile: float = 95.0,
    reference_threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-image table (at ``threshold``, with oracle columns) and the summary dict of one split.

    Args:
        probabilities: the split's probability maps.
        truths: ground-truth masks keyed by the same ids.
        threshold: the frozen threshold chosen on validation.
        oracle_grid: thresholds for the per-image oracle (the validation sweep grid).
        split: split name written into the summary.
        hd_percentile: HD percentile (95).
        reference_threshold: the naive threshold reported alongside (0.5).
        extra: more provenance to put in the summary (e.g. the frozen threshold record).
    """
    table = per_image_metrics(probabilities, truths, threshold, hd_percentile)
    reference = per_image_metrics(probabilities, truths, reference_threshold, hd_percentile)
    _, per_image_dice = sweep_thresholds(
        {i: p for i, p in probabilities.items()}, {i: truths[i] for i in probabilities.ids()}, oracle_grid
    )
    oracle = oracle_thresholds(per_image_dice)
    table = table.merge(oracle, left_on="id", right_index=True, how="left")
    summary = {
        "split": split,
        "n_images": len(table),
        "threshold": float(threshold),
        "conventions": CONVENTIONS,
        "at_threshold": _block(table),
        f"at_{reference_threshold:g}": _block(reference),
        "oracle_upper_bound": {
            "note": "each image at its own best threshold: an UPPER BOUND using test labels, not a result",
            "dice": _describe(table["oracle_dice"]),
            "threshold": _describe(table["oracle_threshold"]),
        },
        "provenance": extra or {},
        "metric_per_case": table.to_dict("records"),
    }
    return table, _json_safe(summary)


def summary_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Flatten a summary into MLflow metrics (``MlflowMetricsHistoryDataset`` format, step 0).

    Names: ``dice_mean, dice_sd, dice_pooled, ..., hd95_n_undefined, at_0.5.dice_mean, ...,
    oracle_dice_mean_upper_bound, threshold``; the dataset's prefix adds the split.
    """
    out: dict[str, float] = {"threshold": summary["threshold"], "n_images": summary["n_images"]}
    for block_name, prefix in (("at_threshold", ""), ("at_0.5", "at_0.5.")):
        block = summary.get(block_name)
        if block is None:
            continue
        for metric, stats in block["mean"].items():
            out[f"{prefix}{metric}_mean"] = stats["mean"]
            out[f"{prefix}{metric}_sd"] = stats["sd"]
        out[f"{prefix}hd95_n_undefined"] = block["mean"]["hd95"]["n_undefined"]
        for metric, value in block["pooled"].items():
            out[f"{prefix}{metric}_pooled"] = value
    out["oracle_dice_mean_upper_bound"] = summary["oracle_upper_bound"]["dice"]["mean"]
    return {k: {"value": float(v), "step": 0} for k, v in out.items() if v is not None}
