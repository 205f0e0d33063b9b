"""Per-image metric tables and the nnU-Net-style ``summary.json`` of one split, per phrase.

Every phrase the model was trained on is scored on every image of the split (a phrase absent from an image's
annotation is an empty ground truth there), each at its own frozen threshold. For each phrase the summary
reports, at the frozen threshold and again at 0.5: per-image mean +- SD (sample SD, ddof 1) of every metric,
pooled values (counts summed over all images, then the ratio), and the mean Dice of each image's own best
threshold, labelled as an upper bound (it peeks at the test labels). ``macro`` is the unweighted mean over
phrases of those numbers. HD95 is NaN where exactly one mask is empty: means skip those images and
``n_undefined`` counts them. NaN is written to JSON as ``null``.

``summary.json`` layout: ``split``, ``n_images``, ``phrases`` ({phrase: {threshold, n_images_with_phrase,
at_threshold, at_0.5, oracle_upper_bound}}), ``macro`` ({at_threshold, at_0.5: {mean: {metric: ...},
pooled: {metric: ...}}, oracle_dice_mean}; the evaluation adds ``mean_ci95`` / ``pooled_ci95`` to the macro
``at_threshold``: ``evaluation.bootstrap.add_macro_ci95``), ``threshold`` (the first phrase's, for old readers),
``conventions``, ``provenance``, ``metric_per_case`` (the per-image rows, with ``phrase``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.prediction.maps import ProbabilityMaps, binarize

from .metrics import METRIC_NAMES, image_metrics, pooled_metrics
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
    "phrases": "every trained phrase on every image; a phrase absent from an image is an empty ground truth",
    "macro": "unweighted mean over phrases of each phrase's numbers",
}


def per_image_metrics(
    probabilities: Mapping[str, np.ndarray],
    truths: Mapping[str, np.ndarray],
    threshold: float,
    hd_percentile: float = 95.0,
) -> pd.DataFrame:
    """One row per image: metrics and counts at ``threshold`` (columns ``id, threshold, dice, ...``).

    ``probabilities`` is ``{id: float32 map}`` of one phrase (``ProbabilityMaps.of_phrase``).
    """
    missing = [i for i in probabilities if i not in truths]
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


def describe_values(values: pd.Series) -> dict[str, Any]:
    """Mean, sample SD (ddof 1), median and counts of a metric column; NaN values are counted as undefined."""
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
        "mean": {m: describe_values(table[m]) for m in METRIC_NAMES},
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


def evaluate_phrase(
    probabilities: Mapping[str, np.ndarray],
    truths: Mapping[str, np.ndarray],
    threshold: float,
    oracle_grid: np.ndarray,
    hd_percentile: float = 95.0,
    reference_threshold: float = 0.5,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-image table (at ``threshold``, with oracle columns) and the summary block of one phrase.

    Args:
        probabilities: ``{id: float32 map}`` of the phrase.
        truths: its ground-truth masks keyed by the same ids (empty where the phrase is absent).
        threshold: the phrase's frozen threshold chosen on validation.
        oracle_grid: thresholds for the per-image oracle (the validation sweep grid).
        hd_percentile: HD percentile (95).
        reference_threshold: the naive threshold reported alongside (0.5).
    """
    table = per_image_metrics(probabilities, truths, threshold, hd_percentile)
    reference = per_image_metrics(probabilities, truths, reference_threshold, hd_percentile)
    ids_truths = {i: truths[i] for i in probabilities}
    _, per_image_dice = sweep_thresholds(dict(probabilities), ids_truths, oracle_grid)
    table = table.merge(oracle_thresholds(per_image_dice), left_on="id", right_index=True, how="left")
    block = {
        "threshold": float(threshold),
        "n_images": len(table),
        "n_images_with_phrase": int(sum(bool(np.any(truths[i])) for i in probabilities)),
        "at_threshold": _block(table),
        f"at_{reference_threshold:g}": _block(reference),
        "oracle_upper_bound": {
            "note": "each image at its own best threshold: an UPPER BOUND using test labels, not a result",
            "dice": describe_values(table["oracle_dice"]),
            "threshold": describe_values(table["oracle_threshold"]),
        },
    }
    return table, block


def _mean_of(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else None


def macro_block(blocks: Mapping[str, dict[str, Any]], reference_key: str) -> dict[str, Any]:
    """Unweighted mean over phrases of each metric's per-image mean and pooled value, and of oracle Dice."""
    macro: dict[str, Any] = {"n_phrases": len(blocks)}
    for key in ("at_threshold", reference_key):
        macro[key] = {
            "mean": {m: _mean_of([b[key]["mean"][m]["mean"] for b in blocks.values()]) for m in METRIC_NAMES},
            "pooled": {
                m: _mean_of([b[key]["pooled"].get(m) for b in blocks.values()])
                for m in next(iter(blocks.values()))[key]["pooled"]
            },
        }
    macro["oracle_dice_mean"] = _mean_of([b["oracle_upper_bound"]["dice"]["mean"] for b in blocks.values()])
    return macro


def evaluate_split(
    maps: ProbabilityMaps,
    truths: Mapping[str, Mapping[str, np.ndarray]],
    thresholds: Mapping[str, float],
    oracle_grid: np.ndarray,
    split: str,
    hd_percentile: float = 95.0,
    reference_threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-image table (one row per image and phrase, ``phrase`` column) and the summary dict of one split.

    Args:
        maps: the split's probability maps keyed by (id, phrase).
        truths: ``{phrase: {id: mask}}`` for every phrase to score (every image of the split each).
        thresholds: ``{phrase: frozen threshold}``.
        oracle_grid: thresholds for the per-image oracle (the validation sweep grid).
        split: split name written into the summary.
        hd_percentile: HD percentile (95).
        reference_threshold: the naive threshold reported alongside (0.5).
        extra: more provenance to put in the summary (e.g. the frozen threshold record).
    """
    tables, blocks = [], {}
    for phrase, phrase_truth in truths.items():
        table, blocks[phrase] = evaluate_phrase(
            maps.of_phrase(phrase), phrase_truth, thresholds[phrase], oracle_grid, hd_percentile,
            reference_threshold,
        )
        tables.append(table.assign(phrase=phrase)[["id", "phrase", *[c for c in table.columns if c != "id"]]])
    table = pd.concat(tables, ignore_index=True)
    first = next(iter(blocks))
    summary = {
        "split": split,
        "n_images": int(table["id"].nunique()),
        "threshold": blocks[first]["threshold"],
        "phrases": blocks,
        "macro": macro_block(blocks, f"at_{reference_threshold:g}"),
        "conventions": CONVENTIONS,
        "provenance": extra or {},
        "metric_per_case": table.to_dict("records"),
    }
    return table, _json_safe(summary)


def metric_key(phrase: str) -> str:
    """The phrase as part of an MLflow metric name: characters MLflow refuses (outside letters, digits,
    ``_ - . : /`` and space) become ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", phrase)


def _block_metrics(block: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block_name, sub in (("at_threshold", ""), ("at_0.5", "at_0.5.")):
        if block_name not in block:
            continue
        for metric, stats in block[block_name]["mean"].items():
            if isinstance(stats, dict):
                out[f"{prefix}{sub}{metric}_mean"] = stats["mean"]
                out[f"{prefix}{sub}{metric}_sd"] = stats["sd"]
            else:  # the macro block holds plain means
                out[f"{prefix}{sub}{metric}_mean"] = stats
        for metric, value in block[block_name]["pooled"].items():
            out[f"{prefix}{sub}{metric}_pooled"] = value
    return out


def summary_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Flatten a summary into MLflow metrics (``MlflowMetricsHistoryDataset`` format, step 0).

    Names: ``<phrase>.dice_mean, <phrase>.dice_sd, <phrase>.dice_pooled, ..., <phrase>.at_0.5.dice_mean, ...,
    <phrase>.threshold, <phrase>.oracle_dice_mean_upper_bound``, then ``macro.dice_mean``, ...
    and ``n_images``; the dataset's prefix adds the split.
    """
    out: dict[str, Any] = {"n_images": summary["n_images"]}
    for phrase, block in summary["phrases"].items():
        key = metric_key(phrase)
        out.update(_block_metrics(block, f"{key}."))
        out[f"{key}.threshold"] = block["threshold"]
        out[f"{key}.hd95_n_undefined"] = block["at_threshold"]["mean"]["hd95"]["n_undefined"]
        out[f"{key}.oracle_dice_mean_upper_bound"] = block["oracle_upper_bound"]["dice"]["mean"]
    out.update(_block_metrics(summary["macro"], "macro."))
    out["macro.oracle_dice_mean_upper_bound"] = summary["macro"]["oracle_dice_mean"]
    return {k: {"value": float(v), "step": 0} for k, v in out.items() if v is not None}
