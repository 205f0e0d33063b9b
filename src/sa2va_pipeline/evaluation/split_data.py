"""Glue between a split of the manifest, the trained model and the evaluation library.

``predict_split_probabilities`` re-uses stored maps when they were made by the same trained model
(identity: resolved directory, Kedro version folder, file fingerprint) for the same samples, phrase,
prompt and encoding; only otherwise does it load the model and predict. Samples and masks are always
read through ``sa2va_pipeline.data.samples.load_samples``, the model through
``probabilities.load_prediction_model`` (``training.artifacts.load_trained_model``, imported when called).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .probabilities import (
    ProbabilityMaps,
    cache_key,
    is_reusable,
    load_prediction_model,
    model_identity,
    predict_probability_maps,
)

logger = logging.getLogger(__name__)


def load_split_samples(
    manifest: pd.DataFrame, split: str, phrase: str, ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Samples of ``split`` (optionally only ``ids``) via ``data.samples.load_samples``; ids as strings."""
    from sa2va_pipeline.data.samples import load_samples

    if ids is not None:
        wanted = {str(i) for i in ids}
        manifest = manifest[manifest["id"].astype(str).isin(wanted)]
    samples = load_samples(manifest, split, phrase)
    for sample in samples:
        sample["id"] = str(sample["id"])
    if not samples:
        raise ValueError(f"split '{split}' has no samples in the manifest; check the split pipeline's output")
    return samples


def truth_mask(sample: dict[str, Any]) -> np.ndarray:
    """The sample's ground truth as one HxW 0/1 mask (the union of its masks)."""
    masks = np.asarray(sample["masks"])
    return (masks.reshape(-1, *masks.shape[-2:]).max(axis=0) > 0).astype(np.uint8)


def predict_split_probabilities(
    model_dir: str | Path,
    manifest: pd.DataFrame,
    split: str,
    phrase: str,
    prediction: dict[str, Any],
    stored: ProbabilityMaps | None = None,
) -> ProbabilityMaps:
    """Probability maps of every sample of ``split``: the stored ones if still valid, else predicted.

    Args:
        model_dir: the trained model directory (the ``trained_model`` catalog entry).
        manifest: the split manifest.
        split: ``val`` or ``test``.
        phrase: the text prompt phrase (e.g. "blood vessel").
        prediction: ``device``, ``dtype``, ``batch_size``, ``storage_dtype``, ``question_template``,
            ``answer`` (the ``prediction`` parameters).
        stored: the latest stored maps of this split, or None.
    """
    storage_dtype = prediction.get("storage_dtype", "uint8")
    prompt = {"question_template": prediction.get("question_template"), "answer": prediction.get("answer")}
    # Reading the frames costs seconds; predicting them costs minutes: the ids come from the samples
    # themselves so that the stored maps are compared with exactly what would be predicted.
    samples = load_split_samples(manifest, split, phrase)
    key = cache_key(
        model_identity(model_dir), split, [s["id"] for s in samples], phrase, prompt, storage_dtype
    )
    if is_reusable(stored, key):
        logger.info(
            "Re-using stored %s probability maps of model %s (%d images)",
            split,
            key["model"]["model_dir"],
            len(stored),
        )
        return stored
    logger.info("Predicting %s probability maps for %d images", split, len(samples))
    model = load_prediction_model(model_dir, prediction)
    return predict_probability_maps(
        model.iter_predict_proba,
        samples,
        batch_size=int(prediction.get("batch_size", 8)),
        storage_dtype=storage_dtype,
        prompt_kwargs=prompt,
        metadata=key,
    )
