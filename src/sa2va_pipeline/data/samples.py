"""Load training/evaluation samples: the images of a split manifest with their annotations.json objects.

The annotation entries are the only ground truth downstream (split, training, threshold, evaluation,
overlays): an object's mask is its polygons filled and united as Sa2VA's loader does
(:func:`sa2va_pipeline.data.annotations.entry_to_masks`); objects sharing a (cleaned) phrase are united.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.annotations import entry_to_masks
from sa2va_pipeline.data.image_io import read_rgb
from sa2va_pipeline.errors import UserError

SPLIT_NAMES = ("train", "val", "test")


class MissingAnnotationError(UserError, ValueError):
    """Images of the manifest have no annotations.json entry (the message names them)."""


class AnnotationEntryError(UserError, ValueError):
    """An annotations.json entry cannot be used as ground truth (the message names its image)."""


def index_annotations(annotations: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``{image file name: entry}``; two entries for one image are an error naming it."""
    index: dict[str, Mapping[str, Any]] = {}
    for position, entry in enumerate(annotations):
        name = Path(str(entry["image"])).name
        if name in index:
            raise AnnotationEntryError(
                f"annotations: entry {position} names image {name!r} again; give one entry per image"
            )
        index[name] = entry
    return index


def check_annotations_cover(manifest: pd.DataFrame, annotations: Sequence[Mapping[str, Any]]) -> None:
    """Every manifest image has exactly one annotations.json entry (matched by file name).

    Raises:
        MissingAnnotationError: naming (up to 5 of) the images without an entry, and what to do.
    """
    _check_cover(manifest, index_annotations(annotations))


def _check_cover(manifest: pd.DataFrame, index: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise MissingAnnotationError for manifest images absent from the ``{file name: entry}`` index."""
    missing = [Path(str(p)).name for p in manifest["image"] if Path(str(p)).name not in index]
    if missing:
        raise MissingAnnotationError(
            f"{len(missing)} image(s) of the ingestion manifest have no entry in annotations.json, e.g. "
            f"{missing[:5]}; re-run the annotation pipeline (`kedro run --pipelines=annotation`) so that "
            "every ingested image has an entry (an image without objects gets empty text/mask lists)"
        )


def sample_from_entry(sample_id: str, image: np.ndarray, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The sample dict of one image: objects rasterised, phrases cleaned, objects of one phrase united."""
    from sa2va_pipeline.model.prompts import clean_phrase

    height, width = image.shape[:2]
    texts = list(entry.get("text") or [])
    objects = list(entry.get("mask") or [])
    if len(texts) != len(objects):
        raise AnnotationEntryError(
            f"annotations entry of image {entry['image']!r}: {len(texts)} phrase(s) but "
            f"{len(objects)} object(s); "
            "give one phrase per object"
        )
    masks = entry_to_masks({"mask": objects}, height, width)
    united: dict[str, np.ndarray] = {}
    for text, mask in zip(texts, masks):
        phrase = clean_phrase(text)
        united[phrase] = np.maximum(united[phrase], mask) if phrase in united else mask
    stacked = np.stack(list(united.values())) if united else np.zeros((0, height, width), np.uint8)
    return {"id": sample_id, "image": image, "masks": stacked.astype(np.uint8), "phrases": list(united)}


def _select_rows(manifest: pd.DataFrame, split: str | None, ids: Iterable[str] | None) -> pd.DataFrame:
    rows = manifest
    if split is not None:
        if "split" not in manifest.columns:
            raise ValueError("manifest has no 'split' column: pass the split manifest, or split=None")
        if split not in SPLIT_NAMES:
            known = sorted(set(manifest["split"]))
            raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test' (manifest has {known})")
        rows = rows[rows["split"] == split]
    if ids is not None:
        wanted = {str(i) for i in ids}
        rows = rows[rows["id"].astype(str).isin(wanted)]
    return rows


def load_samples(
    split_manifest: pd.DataFrame,
    annotations: Sequence[Mapping[str, Any]],
    split: str | None = None,
    ids: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Read the frames of one split (or all, or only ``ids``) with their annotated objects.

    Args:
        split_manifest: the split manifest (``id``, ``image`` absolute or relative to the working
            directory, ``split``); the ingestion manifest works with ``split=None``.
        annotations: the annotations.json entries (Sa2VA format), matched to rows by image file name.
        split: ``"train"``, ``"val"``, ``"test"``, or ``None`` for every row.
        ids: only these sample ids (any order; manifest order is kept).

    Returns:
        One dict per frame in manifest order: ``id`` (str), ``image`` ``(H, W, 3)`` uint8 RGB, ``masks``
        ``(n_objects, H, W)`` uint8 0/1, ``phrases`` (cleaned, unique within the sample). n_objects may be 0.

    Raises:
        ValueError: unknown split name, a missing ``split`` column.
        AnnotationEntryError: a bad entry (the message names its image).
        MissingAnnotationError: an image without an entry.
        FileNotFoundError: an image named by the manifest is gone.
    """
    rows = _select_rows(split_manifest, split, ids)
    index = index_annotations(annotations)
    _check_cover(rows, index)
    samples = []
    for row in rows.itertuples(index=False):
        path = Path(row.image)
        if not path.is_file():
            raise FileNotFoundError(f"sample {row.id!r}: image '{path}' named by the manifest does not exist")
        samples.append(sample_from_entry(str(row.id), read_rgb(path), index[path.name]))
    return samples


def phrase_truths(samples: Iterable[dict[str, Any]], phrase: str) -> dict[str, np.ndarray]:
    """``{id: ground truth of phrase}`` over samples (all zeros where the phrase is absent)."""
    return {str(s["id"]): phrase_truth(s, phrase) for s in samples}


def split_phrases(
    split_manifest: pd.DataFrame, annotations: Sequence[Mapping[str, Any]], split: str = "train"
) -> list[str]:
    """The distinct cleaned phrases of the entries of one split's images (what training on it learns)."""
    names = {Path(str(p)).name for p in _select_rows(split_manifest, split, None)["image"]}
    return dataset_phrases([e for e in annotations if Path(str(e["image"])).name in names])


def phrase_truth(sample: dict[str, Any], phrase: str) -> np.ndarray:
    """Ground truth of one phrase in one sample: the union of its objects with that phrase, ``(H, W)`` uint8
    0/1; all zeros when the sample has no object of that phrase (an absent structure is an empty mask)."""
    from sa2va_pipeline.model.prompts import clean_phrase

    masks = np.asarray(sample["masks"])
    height, width = np.asarray(sample["image"]).shape[:2]
    wanted = clean_phrase(phrase)
    picked = [m for m, p in zip(masks.reshape(-1, height, width), sample["phrases"]) if clean_phrase(p) == wanted]
    if not picked:
        return np.zeros((height, width), dtype=np.uint8)
    return (np.max(picked, axis=0) > 0).astype(np.uint8)


def dataset_phrases(annotations: list[dict[str, Any]]) -> list[str]:
    """The distinct phrases of annotations.json entries (cleaned as in training), in order of first appearance."""
    from sa2va_pipeline.model.prompts import clean_phrase

    seen: dict[str, None] = {}
    for entry in annotations:
        for text in entry.get("text", []):
            seen.setdefault(clean_phrase(text), None)
    return list(seen)
