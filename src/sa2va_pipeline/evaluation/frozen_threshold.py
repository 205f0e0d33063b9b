"""One threshold per phrase, chosen on validation, and the frozen-threshold JSON that records them.

Layout of the record (``frozen_threshold.json``)::

    {"thresholds": {"<phrase>": {"threshold": 0.47, "objective": "pooled_dice", "score": ...,
                                 "dice_pooled": ..., "dice_mean": ..., "precision_pooled": ...,
                                 "recall_pooled": ...,
                                 "n_images": 9, "n_images_with_phrase": 7}, ...},
     "threshold": 0.47,            # the first phrase's, for readers of the single-phrase version
     "phrase": "<first phrase>",   # likewise
     "phrases": ["<phrase>", ...], # the phrases the model was trained on, in order
     "chosen_on": "val", "objective": "pooled_dice", "n_images": 9,
     "grid": {"start": 0.05, "stop": 0.95, "step": 0.01}, "model": {...identity of the trained model...}}

Records of the single-phrase version (``threshold`` + ``phrase``, no ``thresholds``) are still read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.errors import UserError
from sa2va_pipeline.prediction.maps import ProbabilityMaps

from .threshold_sweep import choose_threshold, sweep_thresholds

logger = logging.getLogger(__name__)


class MissingThresholdError(UserError, LookupError):
    """A phrase has no frozen threshold (the message says how to get one)."""


def sweep_per_phrase(
    maps: ProbabilityMaps, truths: Mapping[str, Mapping[str, np.ndarray]], grid: np.ndarray
) -> dict[str, pd.DataFrame]:
    """The threshold sweep of every phrase: ``{phrase: sweep table}`` (see ``sweep_thresholds``).

    ``truths`` is ``{phrase: {id: mask}}``; every phrase is swept over every image (absent = empty truth).
    """
    return {phrase: sweep_thresholds(maps.of_phrase(phrase), truths[phrase], grid)[0] for phrase in truths}


def sweep_table(sweeps: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """All phrases' sweeps in one table, ``phrase`` as the first column."""
    parts = [s.assign(phrase=p)[["phrase", *s.columns]] for p, s in sweeps.items()]
    return pd.concat(parts, ignore_index=True)


def split_sweep_table(table: pd.DataFrame, fallback_phrase: str = "") -> dict[str, pd.DataFrame]:
    """``{phrase: sweep}`` from :func:`sweep_table`'s output (a table without ``phrase`` is one phrase)."""
    if "phrase" not in table.columns:
        return {fallback_phrase: table.reset_index(drop=True)}
    return {
        str(p): part.drop(columns="phrase").reset_index(drop=True)
        for p, part in table.groupby("phrase", sort=False)
    }


def frozen_threshold_record(
    sweeps: Mapping[str, pd.DataFrame],
    objective: str,
    phrase_counts: Mapping[str, int],
    n_images: int,
    grid: Mapping[str, float],
    model: Mapping[str, Any],
) -> dict[str, Any]:
    """Choose each phrase's threshold on its sweep and build the frozen-threshold record (module docstring).

    ``phrase_counts`` is the number of val images in which each phrase has an object.
    """
    thresholds = {
        phrase: {
            **choose_threshold(sweep, objective),
            "n_images": int(n_images),
            "n_images_with_phrase": int(phrase_counts.get(phrase, 0)),
        }
        for phrase, sweep in sweeps.items()
    }
    phrases = list(thresholds)
    return {
        "thresholds": thresholds,
        "threshold": thresholds[phrases[0]]["threshold"],
        "phrase": phrases[0],
        "phrases": phrases,
        "chosen_on": "val",
        "objective": objective,
        "n_images": int(n_images),
        "grid": dict(grid),
        "model": dict(model),
    }


def record_phrases(record: Mapping[str, Any]) -> list[str] | None:
    """The phrases a frozen-threshold record covers, or None when it names none (very old records)."""
    if isinstance(record.get("phrases"), list) and record["phrases"]:
        return [str(p) for p in record["phrases"]]
    if isinstance(record.get("thresholds"), Mapping) and record["thresholds"]:
        return list(record["thresholds"])
    return [str(record["phrase"])] if record.get("phrase") else None


def thresholds_by_phrase(record: Mapping[str, Any], phrases: Sequence[str]) -> dict[str, float]:
    """The frozen threshold of each phrase; a single-phrase record gives its one threshold to its phrase.

    Raises:
        MissingThresholdError: a phrase the record has no threshold for (the message says how to get one).
    """
    if isinstance(record.get("thresholds"), Mapping):
        known = {p: float(v["threshold"]) for p, v in record["thresholds"].items()}
    else:
        phrase = record.get("phrase") or (phrases[0] if len(phrases) == 1 else "")
        known = {str(phrase): float(record["threshold"])}
    missing = [p for p in phrases if p not in known]
    if missing:
        raise MissingThresholdError(
            f"the frozen threshold has no threshold for phrase(s) {missing} (it covers {sorted(known)}); "
            "re-run `kedro run --pipelines=threshold`, or set a number with --params inference.threshold=0.5"
        )
    return {p: known[p] for p in phrases}


def scoring_provenance(probabilities: ProbabilityMaps, frozen_threshold: dict[str, Any], split: str) -> dict[str, Any]:
    """Which model chose the thresholds and which one made the maps scored on ``split`` (a warning when they
    differ): the ``provenance`` block of an evaluation summary."""
    now = probabilities.metadata.get("model", {}).get("fingerprint")
    then = frozen_threshold.get("model", {}).get("fingerprint")
    if now and then and now != then:
        logger.warning("The frozen threshold was chosen for another model (%s) than the one scored on %s "
                       "(%s): re-run `kedro run --pipelines=threshold` first", then, split, now)
    return {
        "frozen_threshold": {k: v for k, v in frozen_threshold.items() if k != "model"},
        "threshold_model": frozen_threshold.get("model", {}),
        "probabilities_model": probabilities.metadata.get("model", {}),
        "same_model": bool(now and now == then),
    }
