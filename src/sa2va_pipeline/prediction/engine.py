"""The one prediction engine: every phrase on every image, batched, quantised as the maps arrive.

The model answers one phrase per image (``iter_predict_proba(images, phrases, ...)``), so several phrases on
one image are asked by repeating the image; pairs are ordered image by image (all phrases of an image next to
each other), which keeps a chunk's images few and lets the model's pipeline overlap host and device work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .maps import MapKey, ProbabilityMaps, quantise

logger = logging.getLogger(__name__)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, maybe bf16 or on the GPU
        return array.detach().float().cpu().numpy()
    return np.asarray(array)


def prediction_pairs(samples: Sequence[dict[str, Any]], phrases: Sequence[str]) -> list[tuple[int, str]]:
    """(sample index, phrase) pairs in prediction order: image by image, phrases in the given order."""
    if not phrases:
        raise ValueError("no phrase to predict: give at least one phrase (e.g. 'blood vessel')")
    if len(set(phrases)) != len(phrases):
        raise ValueError(f"phrases must be distinct, got {list(phrases)}")
    return [(index, phrase) for index in range(len(samples)) for phrase in phrases]


def prompt_kwargs(prompt: dict[str, Any] | None) -> dict[str, Any]:
    """The prompt settings for the model (``question_template``, ``answer``); ``None`` = model default."""
    return {k: v for k, v in (prompt or {}).items() if v is not None}


def iter_maps(
    model: Any,
    samples: Sequence[dict[str, Any]],
    phrases: Sequence[str],
    batch_size: int = 8,
    storage_dtype: str = "uint8",
    prompt: dict[str, Any] | None = None,
) -> Iterator[tuple[MapKey, np.ndarray]]:
    """``((id, phrase), map in its storage encoding)`` as the model streams them, in :func:`prediction_pairs`
    order (all phrases of an image together), each checked against its image's size; see :func:`predict_maps`
    for the arguments. A consumer can use an image's maps while later images are still being predicted."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = prediction_pairs(samples, list(phrases))
    images = [samples[index]["image"] for index, _ in pairs]
    asked = [phrase for _, phrase in pairs]
    stream = iter(model.iter_predict_proba(images, asked, batch_size=batch_size, **prompt_kwargs(prompt)))
    for done, (index, phrase) in enumerate(pairs):
        sample = samples[index]
        prob = next(stream, None)
        if prob is None:
            raise ValueError(f"the model returned {done} maps for {len(pairs)} (image, phrase) pairs")
        prob = _to_numpy(prob)
        if prob.shape != np.asarray(sample["image"]).shape[:2]:
            raise ValueError(
                f"sample {sample['id']}: probability map {prob.shape} does not match image "
                f"{np.asarray(sample['image']).shape[:2]}; the model must return maps at the original size"
            )
        yield (str(sample["id"]), phrase), quantise(prob, storage_dtype)
        if (done + 1) % 256 == 0:
            logger.info("Predicted %d/%d probability maps", done + 1, len(pairs))
    if next(stream, None) is not None:
        raise ValueError(f"the model returned more maps than the {len(pairs)} (image, phrase) pairs")


def predict_maps(
    model: Any,
    samples: Sequence[dict[str, Any]],
    phrases: Sequence[str],
    batch_size: int = 8,
    storage_dtype: str = "uint8",
    prompt: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ProbabilityMaps:
    """Probability maps of every phrase on every sample, keyed by ``(id, phrase)``; no text generation.

    Args:
        model: anything with ``iter_predict_proba(images, phrases, question_template=..., answer=...,
            batch_size=...)`` yielding one [H, W] map per image (``Sa2VA``); a [N, H, W] result works too.
        samples: dicts with ``id`` and ``image`` (HxWx3 uint8); their ground truth is not used.
        phrases: the phrases to ask on every image (cleaned phrases, distinct).
        batch_size: (image, phrase) pairs per forward pass.
        storage_dtype: ``uint8`` or ``float16`` (see :func:`~sa2va_pipeline.prediction.maps.quantise`).
        prompt: ``question_template`` / ``answer``; ``None`` values keep the model's defaults.
        metadata: provenance to store with the maps (``phrases``, ``ids`` and ``storage_dtype`` are added).
    """
    maps = dict(iter_maps(model, samples, phrases, batch_size, storage_dtype, prompt))
    logger.info("Predicted %d maps (%d images x %d phrases)", len(maps), len(samples), len(phrases))
    meta = {**(metadata or {}), "phrases": list(phrases), "ids": [str(s["id"]) for s in samples]}
    meta.setdefault("storage_dtype", storage_dtype)
    return ProbabilityMaps(maps=maps, metadata=meta)
