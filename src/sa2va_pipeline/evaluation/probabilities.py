"""Probability maps of a split, computed once per trained model and re-used by sweeps and evaluations.

:class:`ProbabilityMaps` holds one map per sample id in its storage encoding (``uint8``: round(p * 255),
a resolution of 1/255; or ``float16``) together with metadata saying which model, split, phrase and
prompt produced it. The maps are quantised as soon as they are predicted, so a sweep gives the same
numbers whether the maps came straight from the model or back from disk.

A pixel is foreground when ``probability >= threshold`` (:func:`binarize`); every module uses that rule.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STORAGE_DTYPES = ("uint8", "float16")


def quantise(probabilities: np.ndarray, storage_dtype: str = "uint8") -> np.ndarray:
    """Encode probabilities in [0, 1] for storage: ``uint8`` (round(p * 255)) or ``float16``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float32), 0.0, 1.0)
    if storage_dtype == "uint8":
        return np.rint(p * 255.0).astype(np.uint8)
    if storage_dtype == "float16":
        return p.astype(np.float16)
    raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")


def dequantise(stored: np.ndarray) -> np.ndarray:
    """Float32 probabilities from a stored map (uint8 maps are divided by 255)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(255.0)
    return stored.astype(np.float32)


def binarize(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground mask: ``probability >= threshold`` (compared in float32, as the threshold sweep does)."""
    return np.asarray(probabilities, dtype=np.float32) >= np.float32(threshold)


@dataclass
class ProbabilityMaps:
    """Probability maps keyed by sample id, in storage encoding, plus provenance metadata.

    ``metadata`` keys written by :func:`predict_probability_maps`: ``split``, ``phrase``, ``model``
    (see :func:`model_identity`), ``prompt`` (question template and answer), ``storage_dtype``, ``ids``.
    """

    maps: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.maps)

    def ids(self) -> list[str]:
        """Sample ids in stored order."""
        return list(self.maps)

    def probabilities(self, sample_id: str) -> np.ndarray:
        """The float32 probability map of one sample."""
        return dequantise(self.maps[sample_id])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(id, float32 probability map) pairs in stored order."""
        for sample_id in self.maps:
            yield sample_id, self.probabilities(sample_id)


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


def cache_key(
    model: dict[str, str],
    split: str,
    ids: Sequence[str],
    phrase: str,
    prompt: dict[str, Any],
    storage_dtype: str,
) -> dict[str, Any]:
    """The metadata that must match for stored maps to be re-used instead of predicted again."""
    return {
        "split": split,
        "phrase": phrase,
        "model": dict(model),
        "prompt": dict(prompt),
        "storage_dtype": storage_dtype,
        "ids": list(ids),
    }


def is_reusable(stored: ProbabilityMaps | None, key: dict[str, Any]) -> bool:
    """True when ``stored`` was produced by the same model, split, samples, phrase, prompt and encoding."""
    if stored is None:
        return False
    meta = stored.metadata
    same = all(meta.get(name) == value for name, value in key.items() if name != "ids")
    return same and sorted(meta.get("ids", [])) == sorted(key["ids"]) and set(stored.maps) == set(key["ids"])


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, maybe bf16 or on the GPU
        return array.detach().float().cpu().numpy()
    return np.asarray(array)


def predict_probability_maps(
    predict_proba: Callable[..., Any],
    samples: Sequence[dict[str, Any]],
    batch_size: int,
    storage_dtype: str = "uint8",
    prompt_kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ProbabilityMaps:
    """Run ``predict_proba`` (e.g. ``Sa2VA.predict_proba``) over samples in batches; no text generation.

    Args:
        predict_proba: callable ``(images, phrases, **prompt_kwargs, batch_size=...)`` returning or
            yielding one [H, W] map per image (e.g. ``Sa2VA.iter_predict_proba``).
        samples: dicts with ``id``, ``image`` (HxWx3 uint8) and ``phrases`` (the first phrase is used).
        batch_size: images per forward pass.
        storage_dtype: ``uint8`` or ``float16`` (see :func:`quantise`).
        prompt_kwargs: extra keyword arguments (question template, answer); ``None`` values are dropped
            so the model's own defaults apply.
        metadata: provenance to store with the maps.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kwargs = {k: v for k, v in (prompt_kwargs or {}).items() if v is not None}
    images = [s["image"] for s in samples]
    phrases = [s["phrases"][0] if isinstance(s["phrases"], (list, tuple)) else s["phrases"] for s in samples]
    # One call over all samples: the model pipelines its chunks (preprocessing, GPU, copies back), and a
    # streaming predictor (Sa2VA.iter_predict_proba) hands maps over one by one, so only the quantised maps
    # are kept. A [N, H, W] tensor/array or a list of [H, W] maps (frames of different sizes) works too.
    maps: dict[str, np.ndarray] = {}
    predicted = iter(predict_proba(images, phrases, batch_size=batch_size, **kwargs))
    for sample in samples:
        prob = next(predicted, None)
        if prob is None:
            raise ValueError(f"predict_proba returned {len(maps)} maps for {len(samples)} images")
        prob = _to_numpy(prob)
        if prob.shape != sample["image"].shape[:2]:
            raise ValueError(
                f"sample {sample['id']}: probability map {prob.shape} does not match image "
                f"{sample['image'].shape[:2]}; predict_proba must return maps at the original size"
            )
        maps[str(sample["id"])] = quantise(prob, storage_dtype)
        if len(maps) % (batch_size * 8) == 0:
            logger.info("Predicted probability maps for %d/%d images", len(maps), len(samples))
    if next(predicted, None) is not None:
        raise ValueError(f"predict_proba returned more maps than the {len(samples)} images")
    logger.info("Predicted probability maps for %d images", len(maps))
    meta = dict(metadata or {})
    meta.setdefault("storage_dtype", storage_dtype)
    meta.setdefault("ids", list(maps))
    return ProbabilityMaps(maps=maps, metadata=meta)


def load_prediction_model(model_dir: str | os.PathLike, prediction: dict[str, Any]) -> Any:
    """The trained model ready to predict, as the ``prediction`` parameters say: ``device``, ``dtype`` and
    ``compile`` (``torch.compile`` the encoders and LLM layers: worth it on a GPU for hundreds of images)."""
    from sa2va_pipeline.devices import resolve_device, resolve_dtype
    from sa2va_pipeline.training.artifacts import load_trained_model

    device = resolve_device(prediction.get("device", "auto"))
    model = load_trained_model(model_dir, device, resolve_dtype(prediction.get("dtype", "auto"), device))
    logger.info("Prediction model on %s%s", device, ", compiled" if prediction.get("compile", False) else "")
    if prediction.get("compile", False):
        model.compile_for_inference()
    return model
