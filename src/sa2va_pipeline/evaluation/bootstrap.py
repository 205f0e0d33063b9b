"""Confidence intervals from a bootstrap that resamples groups (videos / patients), never frames.

Frames of one video are strongly correlated: resampling frames treats 7 frames of one video as 7 independent
cases and gives intervals that are far too narrow. Here each bootstrap replicate draws ``n_groups`` groups with
replacement; every frame of a drawn group comes along (a group drawn twice counts twice). The interval is the
percentile interval of the replicate statistics (``level`` = 0.95: the 2.5th and 97.5th percentiles).

Statistics:

- ``mean`` of a per-image metric: replicate = sum of the drawn groups' finite values / their count (NaN values,
  e.g. an undefined HD95, are skipped as the summary's mean skips them);
- ``pooled`` metrics: the drawn groups' confusion / skeleton counts are summed and the ratio taken, exactly as
  :func:`sa2va_pipeline.evaluation.metrics.pooled_metrics` does for the whole split;
- paired differences (model A minus model B on the same images): the per-image difference is the value.
- the ``macro`` mean over phrases: groups are drawn ONCE per replicate for all phrases, each phrase's mean
  (or pooled value) is computed on that draw and the replicate is their unweighted mean.

With a single group there is no interval (``low``/``high`` None and a ``note``); with few groups (say < 10) the
percentile interval is too narrow (it cannot show variation the few groups do not contain): read it as a floor
on the uncertainty.

All replicates are drawn at once as a ``B x n_groups`` matrix of multiplicities (a multinomial draw), so
B = 2,000 over a few hundred images takes milliseconds. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

METHOD = (
    "percentile bootstrap over groups (videos/patients) resampled with replacement; frames never resampled"
)

# Fewer groups than this give no interval (None): resampling one video always returns that video.
MIN_GROUPS = 2

# Count columns of the per-image table that pooled metrics are computed from (metrics.image_metrics).
COUNT_COLUMNS = (
    "tp",
    "fp",
    "fn",
    "tn",
    "pred_skeleton",
    "pred_skeleton_in_truth",
    "truth_skeleton",
    "truth_skeleton_in_pred",
)


def group_multiplicities(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n_groups)`` counts: how often each group is drawn in each replicate (rows sum to
    ``n_groups``)."""
    if n_groups < 1:
        raise ValueError("a group bootstrap needs at least one group")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples).astype(np.float64)


def _interval(replicates: np.ndarray, level: float) -> tuple[float | None, float | None]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _codes(groups: Sequence[Any]) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(pd.Series(list(groups), dtype="object").astype(str), sort=True)
    return codes, len(uniques)


def _record(
    low: float | None, high: float | None, n_groups: int, n_resamples: int, level: float
) -> dict[str, Any]:
    if n_groups < MIN_GROUPS:  # one group resampled is always itself: a zero-width interval would mislead
        return {"low": None, "high": None, "level": level, "n_groups": n_groups, "n_resamples": n_resamples,
                "note": f"undefined: needs >= {MIN_GROUPS} groups (videos/patients), the data has {n_groups}"}
    return {"low": low, "high": high, "level": level, "n_groups": n_groups, "n_resamples": n_resamples}


def group_bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[Any],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile interval of the mean of per-image ``values`` with whole ``groups`` resampled.

    Returns ``{"low", "high", "level", "n_groups", "n_resamples"}`` (low/high None when no value is finite).
    """
    values = np.asarray(values, dtype=np.float64)
    codes, n_groups = _codes(groups)
    if len(codes) != len(values):
        raise ValueError(f"{len(values)} values but {len(codes)} group labels")
    replicates = _mean_replicates(values, codes, n_groups, group_multiplicities(n_groups, n_resamples, seed))
    return _record(*_interval(replicates, level), n_groups, n_resamples, level)


def _mean_replicates(values: np.ndarray, codes: np.ndarray, n_groups: int, weights: np.ndarray) -> np.ndarray:
    """``(B,)`` replicate means of ``values`` (NaN skipped) for the ``(B, n_groups)`` multiplicities."""
    finite = np.isfinite(values)
    sums = np.bincount(codes, weights=np.where(finite, values, 0.0), minlength=n_groups)
    counts = np.bincount(codes, weights=finite.astype(np.float64), minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ sums) / (weights @ counts)


def _pooled_replicates(
    counts: pd.DataFrame, codes: np.ndarray, n_groups: int, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """``{metric: (B,) replicates}`` of the pooled metrics: the drawn groups' counts summed, then the ratio."""
    from .metrics import ConfusionCounts, SkeletonCounts, cldice_from_counts, overlap_metrics

    missing = [c for c in COUNT_COLUMNS if c not in counts.columns]
    if missing:
        raise ValueError(f"per-image table lacks the count column(s) {missing} that pooled metrics need")
    per_group = {
        c: np.bincount(codes, weights=counts[c].to_numpy(np.float64), minlength=n_groups)
        for c in COUNT_COLUMNS
    }
    totals = {c: weights @ v for c, v in per_group.items()}  # (B,) per count
    replicates: dict[str, list[float]] = {}
    for b in range(weights.shape[0]):
        row = overlap_metrics(ConfusionCounts(*(int(round(totals[c][b])) for c in ("tp", "fp", "fn", "tn"))))
        row["cldice"] = cldice_from_counts(
            SkeletonCounts(*(int(round(totals[c][b])) for c in COUNT_COLUMNS[4:]))
        )
        for name, value in row.items():
            replicates.setdefault(name, []).append(value)
    return {name: np.asarray(v, dtype=np.float64) for name, v in replicates.items()}


def group_bootstrap_pooled(
    counts: pd.DataFrame,
    groups: Sequence[Any],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Percentile intervals of the pooled metrics (Dice, IoU, precision, recall, specificity, clDice) with
    whole ``groups`` resampled; ``counts`` holds one row per image with the :data:`COUNT_COLUMNS`."""
    codes, n_groups = _codes(groups)
    if len(codes) != len(counts):
        raise ValueError(f"{len(counts)} rows but {len(codes)} group labels")
    weights = group_multiplicities(n_groups, n_resamples, seed)
    replicates = _pooled_replicates(counts, codes, n_groups, weights)
    return {name: _record(*_interval(v, level), n_groups, n_resamples, level) for name, v in replicates.items()}


def group_bootstrap_macro(
    per_image: pd.DataFrame,
    groups: Sequence[Any],
    metrics: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Percentile intervals of the MACRO mean over phrases (the summary's ``macro`` block) with whole groups
    resampled ONCE per replicate for every phrase: each replicate draws groups, computes every phrase's
    statistic on the drawn groups' rows, and takes the unweighted mean over phrases (phrases whose statistic
    is undefined in that replicate are skipped, as the macro point estimate skips them).

    ``per_image`` holds one row per image and phrase (column ``phrase``, the ``metrics`` columns and, for the
    pooled intervals, the :data:`COUNT_COLUMNS`); ``groups`` gives each row's group. Because the phrases share
    the draw, the interval keeps their correlation (one hard video lowers every phrase in the same replicate).

    Returns ``{"mean": {metric: record}, "pooled": {metric: record}}`` (records as
    :func:`group_bootstrap_mean`; ``pooled`` only when the count columns are there).
    """
    codes, n_groups = _codes(groups)
    if len(codes) != len(per_image):
        raise ValueError(f"{len(per_image)} rows but {len(codes)} group labels")
    if "phrase" not in per_image.columns:
        raise ValueError("a macro interval needs the per-image table's 'phrase' column")
    weights = group_multiplicities(n_groups, n_resamples, seed)
    phrase_of = per_image["phrase"].astype(str).to_numpy()
    parts = [(codes[phrase_of == p], per_image[phrase_of == p]) for p in dict.fromkeys(phrase_of)]

    def macro(stacked: list[np.ndarray]) -> np.ndarray:
        matrix = np.vstack(stacked)  # (phrases, B)
        finite = np.isfinite(matrix)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(finite, matrix, 0.0).sum(axis=0) / finite.sum(axis=0)

    out: dict[str, dict[str, dict[str, Any]]] = {"mean": {}}
    for metric in metrics:
        if metric not in per_image.columns:
            continue
        reps = macro([_mean_replicates(t[metric].to_numpy(np.float64), c, n_groups, weights) for c, t in parts])
        out["mean"][metric] = _record(*_interval(reps, level), n_groups, n_resamples, level)
    if all(c in per_image.columns for c in COUNT_COLUMNS):
        pooled = [_pooled_replicates(t, c, n_groups, weights) for c, t in parts]
        out["pooled"] = {
            name: _record(*_interval(macro([p[name] for p in pooled]), level), n_groups, n_resamples, level)
            for name in pooled[0]
        }
    return out


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    groups: Mapping[str, Any],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Mean of ``a[id] - b[id]`` over the images both score, with a group-bootstrap interval.

    ``a`` and ``b`` map image id -> metric (e.g. Dice of Sa2VA and of the baseline on the same test images);
    ``groups`` maps image id -> group. Returns ``{"mean", "low", "high", "level", "n_images", "n_groups",
    "n_resamples", "method"}``.

    Raises:
        ValueError: the two sides share no image, or an image has no group.
    """
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError("paired comparison: the two result tables share no image id")
    missing = [i for i in ids if i not in groups]
    if missing:
        raise ValueError(f"paired comparison: no group for image(s) {missing[:5]}")
    diff = np.array([float(a[i]) - float(b[i]) for i in ids])
    interval = group_bootstrap_mean(diff, [groups[i] for i in ids], n_resamples, seed, level)
    finite = diff[np.isfinite(diff)]
    return {
        "mean": float(finite.mean()) if finite.size else None,
        **interval,
        "n_images": len(ids),
        "method": METHOD,
    }


def metric_intervals(
    per_image: pd.DataFrame,
    groups: Sequence[Any],
    metrics: Sequence[str],
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Group-bootstrap intervals of the per-image means (``metrics`` columns) and, when the count columns are
    there, of the pooled metrics: ``{"mean": {metric: record}, "pooled": {metric: record}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {
        "mean": {
            m: group_bootstrap_mean(per_image[m], groups, n_resamples, seed, level)
            for m in metrics
            if m in per_image.columns
        }
    }
    if all(c in per_image.columns for c in COUNT_COLUMNS):
        out["pooled"] = group_bootstrap_pooled(per_image, groups, n_resamples, seed, level)
    return out


def _pair(record: dict[str, Any]) -> list[float | None]:
    return [record["low"], record["high"]]


def add_ci95_to_block(
    block: dict[str, Any],
    per_image: pd.DataFrame,
    groups: Sequence[Any],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Put ``ci95: [low, high]`` beside each mean of one summary block (``{"mean": {metric: {"mean", ...}},
    "pooled": {metric: value}}``) and ``pooled_ci95: {metric: [low, high]}`` beside the pooled values.

    ``per_image`` holds the rows this block was computed from (metric columns + counts), ``groups`` their
    groups in the same order. Returns the block (changed in place).
    """
    metrics = list(block.get("mean", {}))
    intervals = metric_intervals(per_image, groups, metrics, n_resamples, seed, 0.95)
    for metric, record in intervals["mean"].items():
        block["mean"][metric]["ci95"] = _pair(record)
    if "pooled" in intervals and "pooled" in block:
        block["pooled_ci95"] = {m: _pair(r) for m, r in intervals["pooled"].items() if m in block["pooled"]}
    n_groups = len(set(map(str, groups)))
    block["ci95_method"] = {"method": METHOD, "n_groups": n_groups, "n_resamples": n_resamples, "seed": seed}
    if n_groups < MIN_GROUPS:
        block["ci95_method"]["note"] = f"no interval: needs >= {MIN_GROUPS} groups, this split has {n_groups}"
    return block


def add_macro_ci95(
    macro: dict[str, Any],
    per_image: pd.DataFrame,
    groups: Sequence[Any],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Put ``mean_ci95: {metric: [low, high]}`` and ``pooled_ci95: {metric: [low, high]}`` beside the plain
    macro values of one macro block (``{"mean": {metric: value}, "pooled": {metric: value}}``, e.g.
    ``summary["macro"]["at_threshold"]``), from :func:`group_bootstrap_macro`; ``per_image`` holds every
    phrase's rows (column ``phrase``), ``groups`` their groups in the same order. Returns the block (in place).
    """
    metrics = [m for m in macro.get("mean", {}) if m in per_image.columns]
    intervals = group_bootstrap_macro(per_image, groups, metrics, n_resamples, seed, 0.95)
    macro["mean_ci95"] = {m: _pair(r) for m, r in intervals["mean"].items()}
    if "pooled" in intervals and "pooled" in macro:
        macro["pooled_ci95"] = {m: _pair(r) for m, r in intervals["pooled"].items() if m in macro["pooled"]}
    n_groups = len(set(map(str, groups)))
    macro["ci95_method"] = {
        "method": METHOD + "; groups drawn once per replicate for all phrases, then the mean over phrases",
        "n_groups": n_groups,
        "n_resamples": n_resamples,
        "seed": seed,
    }
    if n_groups < MIN_GROUPS:
        macro["ci95_method"]["note"] = f"no interval: needs >= {MIN_GROUPS} groups, this split has {n_groups}"
    return macro


def add_ci95(
    summary: dict[str, Any],
    per_image: pd.DataFrame,
    groups: Mapping[str, Any],
    n_resamples: int = 2000,
    seed: int = 0,
    block: str = "at_threshold",
) -> dict[str, Any]:
    """Add group-bootstrap ``ci95`` intervals to the ``block`` of an evaluation summary (see
    :func:`add_ci95_to_block`); ``per_image`` is that block's per-image table (column ``id``), ``groups`` maps
    image id -> group. Returns the summary (changed in place).

    Raises:
        ValueError: an image of the table has no group.
    """
    ids = per_image["id"].astype(str).tolist()
    missing = [i for i in ids if i not in groups]
    if missing:
        raise ValueError(f"add_ci95: no group for image(s) {missing[:5]}; pass the split manifest's groups")
    add_ci95_to_block(summary[block], per_image, [groups[i] for i in ids], n_resamples, seed)
    return summary
