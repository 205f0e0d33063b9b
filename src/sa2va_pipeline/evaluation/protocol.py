"""The evaluation protocol applied to ANY model's probability maps (Sa2VA, the baseline, a cross-validation fold):
one threshold per phrase chosen on validation with the project's sweep, frozen, then the held-out images scored
at it by the same report code, with group-bootstrap intervals.

Used by the ``baseline`` and ``cross_validation`` pipelines so that every number they report comes from the
same code path as the main evaluation: ``threshold_sweep.sweep_thresholds`` / ``choose_threshold`` (one
tie-break rule), ``report.evaluate_split`` (metrics and conventions) and ``bootstrap`` (intervals).
Maps are handled as ``{phrase: ProbabilityMaps}``; ground truth is ``data.samples.phrase_truth``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import add_ci95_to_block, metric_intervals
from .metrics import METRIC_NAMES, pooled_metrics
from .probabilities import ProbabilityMaps, predict_probability_maps, quantise
from .report import evaluate_split
from .threshold_sweep import choose_threshold, sweep_thresholds, threshold_grid

log = logging.getLogger(__name__)

PhraseMaps = dict[str, ProbabilityMaps]


def split_samples(
    split_manifest: pd.DataFrame, annotations: list[dict[str, Any]], split: str | None
) -> list[dict[str, Any]]:
    """Samples of one split (``None``: every row) through the project's one loader; ids as strings."""
    import inspect

    from sa2va_pipeline.data.samples import dataset_phrases, load_samples

    rows = split_manifest if split is None else split_manifest[split_manifest["split"] == split]
    if rows.empty:
        return []
    if "annotations" in inspect.signature(load_samples).parameters:
        samples = load_samples(rows, annotations)
    else:  # the single-phrase loader (PNG masks, one phrase)
        samples = load_samples(rows, None, dataset_phrases(annotations)[0])
    for sample in samples:
        sample["id"] = str(sample["id"])
    return samples


def model_phrases(annotations: list[dict[str, Any]]) -> list[str]:
    """The phrases a model trained on these annotations segments (every object text, first appearance order)."""
    from sa2va_pipeline.data.samples import dataset_phrases

    phrases = dataset_phrases(annotations)
    if not phrases:
        raise ValueError("annotations.json has no object text: there is no phrase to train or score")
    return phrases


def as_probability_maps(
    maps: Mapping[str, Mapping[str, np.ndarray]],
    split: str,
    model: dict[str, Any],
    storage_dtype: str = "uint8",
) -> PhraseMaps:
    """Float maps ``{phrase: {id: (H, W)}}`` -> ``{phrase: ProbabilityMaps}`` quantised like stored maps (so a
    sweep gives the same numbers as for maps read back from disk)."""
    return {
        phrase: ProbabilityMaps(
            maps={i: quantise(m, storage_dtype) for i, m in by_id.items()},
            metadata={"split": split, "phrase": phrase, "model": dict(model), "storage_dtype": storage_dtype,
                      "ids": list(by_id)},
        )
        for phrase, by_id in maps.items()
    }


def predict_sa2va_maps(
    model: Any,
    samples: Sequence[dict[str, Any]],
    phrases: Sequence[str],
    prediction: dict[str, Any],
    split: str,
    identity: dict[str, Any] | None = None,
) -> PhraseMaps:
    """Sa2VA probability maps of every sample for every phrase (one prediction pass per phrase)."""
    out: PhraseMaps = {}
    prompt = {"question_template": prediction.get("question_template"), "answer": prediction.get("answer")}
    for phrase in phrases:
        asked = [{**s, "phrases": [phrase]} for s in samples]
        out[phrase] = predict_probability_maps(
            model.iter_predict_proba,
            asked,
            batch_size=int(prediction.get("batch_size", 8)),
            storage_dtype=prediction.get("storage_dtype", "uint8"),
            prompt_kwargs=prompt,
            metadata={"split": split, "phrase": phrase, "model": dict(identity or {}), "prompt": prompt},
        )
    return out


def _truths(samples: Sequence[dict[str, Any]], phrase: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    from sa2va_pipeline.data.samples import phrase_truth

    by_id = {s["id"]: s for s in samples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"no sample for probability map(s) {missing[:5]}")
    return {i: phrase_truth(by_id[i], phrase) for i in ids}


def choose_thresholds(val_maps: PhraseMaps, val_samples: Sequence[dict[str, Any]],
                      threshold: dict[str, Any]) -> dict[str, Any]:
    """One threshold per phrase on validation (``threshold`` = ``params:threshold``: grid and objective).

    Returns the frozen-threshold record of the shared contract: ``{"thresholds": {phrase: {...}}, "threshold"
    (the first phrase's), "phrases", "chosen_on": "val", "grid", "n_images"}``.
    """
    grid_params = {k: threshold[k] for k in ("start", "stop", "step")}
    grid = threshold_grid(**grid_params)
    per_phrase: dict[str, Any] = {}
    for phrase, maps in val_maps.items():
        truths = _truths(val_samples, phrase, maps.ids())
        sweep, _ = sweep_thresholds(dict(maps.items()), truths, grid)
        per_phrase[phrase] = choose_threshold(sweep, threshold.get("objective", "pooled_dice"))
    phrases = list(val_maps)
    return {
        "thresholds": per_phrase,
        "threshold": per_phrase[phrases[0]]["threshold"],
        "phrases": phrases,
        "chosen_on": "val",
        "grid": grid_params,
        "n_images": len(val_samples),
    }


def _describe(values: pd.Series) -> dict[str, Any]:
    finite = values.dropna().to_numpy(np.float64)
    n = len(finite)
    return {"mean": float(finite.mean()) if n else None,
            "sd": float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else None),
            "median": float(np.median(finite)) if n else None, "n": n, "n_undefined": int(len(values) - n)}


def macro_block(phrase_blocks: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over phrases of each phrase's per-image mean and pooled value (every phrase counts
    the same, however many pixels it has)."""
    def mean(values: list[Any]) -> float | None:
        finite = [float(v) for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    blocks = list(phrase_blocks.values())
    return {
        "phrases": list(phrase_blocks),
        "mean": {m: mean([b["mean"][m]["mean"] for b in blocks]) for m in METRIC_NAMES},
        "pooled": {m: mean([b["pooled"][m] for b in blocks]) for m in blocks[0]["pooled"]} if blocks else {},
    }


def score_phrases(
    maps: PhraseMaps,
    samples: Sequence[dict[str, Any]],
    frozen: dict[str, Any],
    evaluation: dict[str, Any],
    split: str,
    groups: Mapping[str, Any],
    bootstrap: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every phrase's maps at its frozen threshold with the evaluation's report code.

    Returns the per-image table (one row per image and phrase, column ``phrase``, plus ``group``) and the
    summary ``{"split", "n_images", "phrases": {phrase: evaluate_split summary + ci95}, "macro": ...}``.
    """
    bootstrap = bootstrap or {}
    n_resamples, seed = int(bootstrap.get("n_resamples", 2000)), int(bootstrap.get("seed", 0))
    grid = frozen.get("grid", {"start": 0.05, "stop": 0.95, "step": 0.01})
    tables, phrase_summaries = [], {}
    for phrase, phrase_maps in maps.items():
        record = frozen["thresholds"][phrase]
        truths = _truths(samples, phrase, phrase_maps.ids())
        table, summary = evaluate_split(
            phrase_maps, truths, threshold=float(record["threshold"]),
            oracle_grid=threshold_grid(grid["start"], grid["stop"], grid["step"]), split=split,
            hd_percentile=float(evaluation.get("hd_percentile", 95.0)),
            reference_threshold=float(evaluation.get("reference_threshold", 0.5)),
            extra={"frozen_threshold": record},
        )
        summary.pop("metric_per_case", None)  # the per-image table holds them
        table.insert(1, "phrase", phrase)
        table.insert(2, "group", [str(groups[i]) for i in table["id"]])
        add_ci95_to_block(summary["at_threshold"], table, table["group"].tolist(), n_resamples, seed)
        tables.append(table)
        phrase_summaries[phrase] = summary
    per_image = pd.concat(tables, ignore_index=True)
    summary = {
        "split": split,
        "n_images": int(per_image["id"].nunique()),
        "n_groups": int(per_image["group"].nunique()),
        "phrases": phrase_summaries,
        "macro": macro_block({p: s["at_threshold"] for p, s in phrase_summaries.items()}),
    }
    return per_image, summary


def pooled_summary(
    per_image: pd.DataFrame, bootstrap: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per-phrase block over a table that mixes thresholds (e.g. every fold's test images, each at its fold's
    threshold): per-image mean +- SD, pooled counts, and group-bootstrap ``ci95`` (column ``group``)."""
    bootstrap = bootstrap or {}
    n_resamples, seed = int(bootstrap.get("n_resamples", 2000)), int(bootstrap.get("seed", 0))
    out: dict[str, Any] = {}
    for phrase, table in per_image.groupby("phrase", sort=False):
        block = {"mean": {m: _describe(table[m]) for m in METRIC_NAMES},
                 "pooled": pooled_metrics(table.to_dict("records")),
                 "n_images": int(len(table)), "n_groups": int(table["group"].nunique())}
        intervals = metric_intervals(table, table["group"].tolist(), METRIC_NAMES, n_resamples, seed)
        for metric, record in intervals["mean"].items():
            block["mean"][metric]["ci95"] = [record["low"], record["high"]]
        block["pooled_ci95"] = {m: [r["low"], r["high"]] for m, r in intervals["pooled"].items()}
        out[str(phrase)] = block
    return out
