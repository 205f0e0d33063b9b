"""Stored probability maps of a split: re-used when made by the same model for the same request.

The identity of a trained model is its resolved folder, Kedro version folder and a fingerprint of its files;
stored maps are re-used only when model, split, sample ids, phrases, prompt and encoding all match. Only
otherwise is the model loaded and the split predicted (:func:`predict_split_maps`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .engine import predict_maps
from .maps import ProbabilityMaps
from .model_loading import load_prediction_model

logger = logging.getLogger(__name__)


def model_identity(model_dir: str | os.PathLike) -> dict[str, str]:
    """Identify a trained-model directory: its resolved path, version folder and a content fingerprint.

    The fingerprint hashes every file's relative path, size and modification time (not the bytes:
    checkpoints are large), so a model re-saved in place gets a new identity.
    """
    root = Path(model_dir).resolve()
    digest = hashlib.sha256()
    base = root if root.is_dir() else root.parent
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(base)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    # Kedro versioned folders look like <name>/<version>/<name>: the parent's name is the version.
    version = root.parent.name if root.parent.parent.name == root.name else ""
    return {"model_dir": str(root), "model_version": version, "fingerprint": digest.hexdigest()[:16]}


def prompt_settings(prediction: dict[str, Any]) -> dict[str, Any]:
    """The prompt part of the ``prediction`` parameters (``None`` = the model's default)."""
    return {"question_template": prediction.get("question_template"), "answer": prediction.get("answer")}


def cache_key(
    model: dict[str, str],
    split: str,
    ids: Sequence[str],
    phrases: Sequence[str],
    prompt: dict[str, Any],
    storage_dtype: str,
    fp8: Sequence[str] = (),
) -> dict[str, Any]:
    """The metadata that must match for stored maps to be re-used instead of predicted again (``fp8``: the
    parts ``prediction.fp8`` converted; none for bf16/fp32 maps)."""
    return {
        "split": split,
        "phrases": list(phrases),
        "model": dict(model),
        "prompt": dict(prompt),
        "storage_dtype": storage_dtype,
        "fp8": list(fp8),
        "ids": list(ids),
    }


def is_reusable(stored: ProbabilityMaps | None, key: dict[str, Any]) -> bool:
    """True when ``stored`` was made by the same model, split, samples, phrases, prompt and encoding."""
    if stored is None:
        return False
    meta = stored.metadata
    same = all(meta.get(name) == value for name, value in key.items() if name not in ("ids", "phrases", "fp8"))
    same = same and list(meta.get("fp8") or []) == list(key.get("fp8") or [])  # maps stored before fp8: none
    wanted = {(i, p) for i in key["ids"] for p in key["phrases"]}
    return (
        same
        and sorted(meta.get("phrases") or []) == sorted(key["phrases"])
        and sorted(meta.get("ids", [])) == sorted(key["ids"])
        and set(stored.maps) == wanted
    )


def predict_split_maps(
    model_dir: str | Path,
    split_manifest: pd.DataFrame,
    annotations: list[dict[str, Any]],
    split: str,
    phrases: Sequence[str],
    prediction: dict[str, Any],
    stored: ProbabilityMaps | None = None,
) -> ProbabilityMaps:
    """Maps of every phrase on every image of ``split``: the stored ones if still valid, else predicted.

    Args:
        model_dir: the trained model folder (the ``trained_model`` catalog entry).
        split_manifest: the split manifest; ``annotations``: the annotations.json entries.
        split: ``val`` or ``test``.
        phrases: the phrases to predict (the model's trained phrases).
        prediction: the shared ``prediction`` parameters (device, dtype, compile, fp8, batch_size,
            storage_dtype, question_template, answer).
        stored: the latest stored maps of this split, or None.
    """
    from sa2va_pipeline.data.samples import load_samples
    from sa2va_pipeline.model.fp8 import fp8_parts_setting

    storage_dtype = prediction.get("storage_dtype", "uint8")
    samples = load_samples(split_manifest, annotations, split=split)
    if not samples:
        raise ValueError(f"split '{split}' has no images in the split manifest; check the split pipeline")
    prompt = prompt_settings(prediction)
    ids = [s["id"] for s in samples]
    fp8 = fp8_parts_setting(prediction.get("fp8", False))
    key = cache_key(model_identity(model_dir), split, ids, phrases, prompt, storage_dtype, fp8)
    if is_reusable(stored, key):
        model = key["model"]["model_dir"]
        logger.info("Re-using stored %s probability maps of model %s (%d maps)", split, model, len(stored))
        return stored
    logger.info("Predicting %s probability maps: %d images x %d phrase(s)", split, len(samples), len(phrases))
    model = load_prediction_model(model_dir, prediction)
    return predict_maps(
        model, samples, phrases, int(prediction.get("batch_size", 8)), storage_dtype, prompt, metadata=key
    )
