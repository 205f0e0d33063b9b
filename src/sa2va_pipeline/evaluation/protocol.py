"""The evaluation protocol applied to ANY model's probability maps (Sa2VA, the baseline, a cross-validation fold):
one threshold per phrase chosen on validation with the project's sweep, frozen, then the held-out images scored
at it by the same report code, with group-bootstrap intervals.

Used by the ``baseline`` and ``cross_validation`` pipelines so that every number they report comes from the same
code path as the main evaluation: ``frozen_threshold`` (per-phrase sweep and record, one tie-break rule),
``report.evaluate_split`` (metrics, conventions, ``phrases`` + ``macro`` summary), ``prediction.predict_maps``
(the one prediction engine) and ``bootstrap`` (intervals). Maps are ``ProbabilityMaps`` keyed by (id, phrase);
ground truth is ``data.samples.phrase_truths``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.prediction.maps import ProbabilityMaps, quantise

from .bootstrap import add_ci95_to_block, add_macro_ci95, metric_intervals
from .frozen_threshold import frozen_threshold_record, sweep_per_phrase, thresholds_by_phrase
from .metrics import METRIC_NAMES, pooled_metrics
from .report import describe_values, evaluate_split
from .threshold_sweep import threshold_grid

log = logging.getLogger(__name__)


def split_samples(
    split_manifest: pd.DataFrame, annotations: list[dict[str, Any]], split: str | None
) -> list[dict[str, Any]]:
    """Samples of one split (``None``: every row) through the project's one loader."""
    from sa2va_pipeline.data.samples import load_samples

    return load_samples(split_manifest, annotations, split=split)


def model_phrases(split_manifest: pd.DataFrame, annotations: list[dict[str, Any]]) -> list[str]:
    """The phrases a model trained on this manifest's train split learns (and is scored on)."""
    from sa2va_pipeline.data.samples import split_phrases

    phrases = split_phrases(split_manifest, annotations, "train")
    if not phrases:
        raise ValueError("the train split's annotations.json entries have no object text: no phrase to train")
    return phrases


def truths_by_phrase(
    samples: Sequence[dict[str, Any]], phrases: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """``{phrase: {id: mask}}`` over every sample (empty where the phrase is absent)."""
    from sa2va_pipeline.data.samples import phrase_truths

    return {p: phrase_truths(samples, p) for p in phrases}


def as_probability_maps(
    maps: Mapping[str, Mapping[str, np.ndarray]],
    split: str,
    model: dict[str, Any],
    storage_dtype: str = "uint8",
) -> ProbabilityMaps:
    """Float maps ``{phrase: {id: (H, W)}}`` -> ``ProbabilityMaps`` quantised like stored maps (so a sweep gives
    the same numbers as for maps read back from disk)."""
    keyed = {(i, p): quantise(m, storage_dtype) for p, by_id in maps.items() for i, m in by_id.items()}
    ids = list(dict.fromkeys(i for i, _ in keyed))
    return ProbabilityMaps(
        maps=keyed,
        metadata={
            "split": split,
            "model": dict(model),
            "phrases": list(maps),
            "ids": ids,
            "storage_dtype": storage_dtype,
        },
    )


def predict_sa2va_maps(
    model: Any,
    samples: Sequence[dict[str, Any]],
    phrases: Sequence[str],
    prediction: dict[str, Any],
    split: str,
    identity: dict[str, Any] | None = None,
) -> ProbabilityMaps:
    """Sa2VA probability maps of every sample for every phrase, by the one prediction engine."""
    from sa2va_pipeline.prediction.engine import predict_maps
    from sa2va_pipeline.prediction.stored import prompt_settings

    return predict_maps(
        model,
        samples,
        phrases,
        batch_size=int(prediction.get("batch_size", 8)),
        storage_dtype=prediction.get("storage_dtype", "uint8"),
        prompt=prompt_settings(prediction),
        metadata={"split": split, "model": dict(identity or {})},
    )


def choose_thresholds(
    val_maps: ProbabilityMaps, val_samples: Sequence[dict[str, Any]], threshold: dict[str, Any]
) -> dict[str, Any]:
    """One threshold per phrase on validation (``threshold`` = ``params:threshold``: grid and objective); returns
    the frozen-threshold record of the threshold pipeline (``evaluation.frozen_threshold``)."""
    grid = {k: float(threshold[k]) for k in ("start", "stop", "step")}
    phrases = val_maps.phrases()
    truths = truths_by_phrase(val_samples, phrases)
    sweeps = sweep_per_phrase(val_maps, truths, threshold_grid(**grid))
    counts = {p: int(sum(bool(np.any(m)) for m in truths[p].values())) for p in phrases}
    return frozen_threshold_record(
        sweeps,
        threshold.get("objective", "pooled_dice"),
        counts,
        len(val_samples),
        grid,
        val_maps.metadata.get("model", {}),
    )


def add_group_intervals(
    table: pd.DataFrame,
    summary: dict[str, Any],
    groups: Mapping[str, Any],
    bootstrap: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Add ``ci95`` (group bootstrap) to every phrase's ``at_threshold`` block of an evaluation summary and
    ``mean_ci95`` / ``pooled_ci95`` to its macro ``at_threshold`` block (groups drawn once for all phrases), in
    place; returns the per-image table with a ``group`` column (``groups``: image id -> group).

    Raises:
        ValueError: an image of the table has no group.
    """
    bootstrap = bootstrap or {}
    n_resamples, seed = int(bootstrap.get("n_resamples", 2000)), int(bootstrap.get("seed", 0))
    ids = table["id"].astype(str)
    missing = sorted(set(ids) - set(map(str, groups)))
    if missing:
        raise ValueError(
            f"no group for image(s) {missing[:5]}: is the split manifest the one that was scored?"
        )
    table = table.assign(group=[str(groups[i]) for i in ids])
    for phrase, block in summary["phrases"].items():
        rows = table[table["phrase"] == phrase]
        add_ci95_to_block(block["at_threshold"], rows, rows["group"].tolist(), n_resamples, seed)
    if "macro" in summary and "phrase" in table.columns:
        scored = table[table["phrase"].isin(list(summary["phrases"]))]
        add_macro_ci95(summary["macro"]["at_threshold"], scored, scored["group"].tolist(), n_resamples, seed)
    return table


def score_phrases(
    maps: ProbabilityMaps,
    samples: Sequence[dict[str, Any]],
    frozen: dict[str, Any],
    evaluation: dict[str, Any],
    split: str,
    groups: Mapping[str, Any],
    bootstrap: dict[str, Any] | None = None,
    phrases: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
    per_case: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every phrase's maps (``phrases``, default the maps' own) at its frozen threshold with the
    evaluation's report code, plus the group-bootstrap ``ci95`` (``groups``: id -> video/patient).

    Returns the per-image table (one row per image and phrase, with ``group``) and the evaluation summary
    (``phrases`` + ``macro`` + ``extra``; the per-case records stay in the table unless ``per_case``).
    """
    phrases = list(phrases) if phrases is not None else maps.phrases()
    if extra is None:
        extra = {"frozen_threshold": {k: v for k, v in frozen.items() if k != "model"}}
    grid = frozen.get("grid", {"start": 0.05, "stop": 0.95, "step": 0.01})
    table, summary = evaluate_split(
        maps,
        truths_by_phrase(samples, phrases),
        thresholds_by_phrase(frozen, phrases),
        oracle_grid=threshold_grid(grid["start"], grid["stop"], grid["step"]),
        split=split,
        hd_percentile=float(evaluation.get("hd_percentile", 95.0)),
        reference_threshold=float(evaluation.get("reference_threshold", 0.5)),
        extra=extra,
    )
    if not per_case:
        summary.pop("metric_per_case", None)  # the per-image table holds them
    table = add_group_intervals(table, summary, groups, bootstrap)
    summary["n_groups"] = int(table["group"].nunique())
    return table, summary


def pooled_summary(per_image: pd.DataFrame, bootstrap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-phrase block over a table that mixes thresholds (e.g. every fold's test images, each at its fold's
    threshold): per-image mean +- SD, pooled counts, and group-bootstrap ``ci95`` (column ``group``)."""
    bootstrap = bootstrap or {}
    n_resamples, seed = int(bootstrap.get("n_resamples", 2000)), int(bootstrap.get("seed", 0))
    out: dict[str, Any] = {}
    for phrase, table in per_image.groupby("phrase", sort=False):
        block = {
            "mean": {m: describe_values(table[m]) for m in METRIC_NAMES},
            "pooled": pooled_metrics(table.to_dict("records")),
            "n_images": int(len(table)),
            "n_groups": int(table["group"].nunique()),
        }
        intervals = metric_intervals(table, table["group"].tolist(), METRIC_NAMES, n_resamples, seed)
        for metric, record in intervals["mean"].items():
            block["mean"][metric]["ci95"] = [record["low"], record["high"]]
        block["pooled_ci95"] = {m: [r["low"], r["high"]] for m, r in intervals["pooled"].items()}
        out[str(phrase)] = block
    return out
