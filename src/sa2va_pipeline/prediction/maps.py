"""Probability maps keyed by ``(sample id, phrase)``, their storage encoding, and the binarisation rule.

:class:`ProbabilityMaps` holds one map per (image, phrase) in its storage encoding (``uint8``: round(p * 255),
a resolution of 1/255; or ``float16``) together with metadata saying which model, split, phrases and prompt
produced it. Maps are quantised as soon as they are predicted, so a sweep gives the same numbers whether the
maps came straight from the model or back from disk.

A pixel is foreground when ``probability >= threshold`` (:func:`binarize`); every module uses that rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STORAGE_DTYPES = ("uint8", "float16")
MapKey = tuple[str, str]  # (sample id, phrase)


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
    """Stored maps keyed by ``(sample id, phrase)`` plus provenance metadata.

    ``metadata`` keys written by the engine: ``phrases``, ``ids``, ``storage_dtype``, and, for a split,
    ``split``, ``model`` (see :func:`~sa2va_pipeline.prediction.stored.model_identity`) and ``prompt``.
    Keys given as plain ids (the single-phrase format of old files) are read as ``(id, metadata["phrase"])``.
    """

    maps: dict[MapKey, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Accept old single-phrase keys (a plain id): the phrase comes from ``metadata["phrase"]``."""
        if any(not isinstance(key, tuple) for key in self.maps):
            phrase = str(self.metadata.get("phrase") or "")
            self.maps = {k if isinstance(k, tuple) else (str(k), phrase): m for k, m in self.maps.items()}

    def __len__(self) -> int:
        return len(self.maps)

    def keys(self) -> list[MapKey]:
        """``(id, phrase)`` keys in stored order."""
        return list(self.maps)

    def ids(self) -> list[str]:
        """Distinct sample ids in stored order."""
        return list(dict.fromkeys(sample_id for sample_id, _ in self.maps))

    def phrases(self) -> list[str]:
        """Distinct phrases in stored order."""
        return list(dict.fromkeys(phrase for _, phrase in self.maps))

    def probabilities(self, sample_id: str, phrase: str) -> np.ndarray:
        """The float32 probability map of one image and phrase."""
        return dequantise(self.maps[(sample_id, phrase)])

    def items(self) -> Iterator[tuple[MapKey, np.ndarray]]:
        """``((id, phrase), float32 map)`` pairs in stored order."""
        for key in self.maps:
            yield key, dequantise(self.maps[key])

    def of_phrase(self, phrase: str) -> dict[str, np.ndarray]:
        """``{id: float32 map}`` of one phrase, in stored order (raises KeyError for an unknown phrase)."""
        out = {sample_id: dequantise(m) for (sample_id, p), m in self.maps.items() if p == phrase}
        if not out:
            raise KeyError(f"no probability maps for phrase {phrase!r}; stored phrases: {self.phrases()}")
        return out


def phrase_file_names(phrases: list[str] | tuple[str, ...]) -> dict[str, str]:
    """A safe file/folder name per phrase for outputs: lower case, runs of characters other than ``a-z0-9``
    as ``_`` (``blood vessel`` -> ``blood_vessel``); ``_2``, ``_3``... where two phrases give one name."""
    import re

    names: dict[str, str] = {}
    for phrase in phrases:
        base = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_") or "phrase"
        name, n = base, 2
        while name in names.values():
            name, n = f"{base}_{n}", n + 1
        names[phrase] = name
    return names
