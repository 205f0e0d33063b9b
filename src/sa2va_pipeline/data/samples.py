"""Load training/evaluation samples from a (split) manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.image_io import read_mask01, read_rgb


def load_samples(manifest: pd.DataFrame, split: str | None, phrase: str) -> list[dict[str, Any]]:
    """Read the frames of one split into memory.

    Args:
        manifest: the split manifest (columns ``id``, ``image``, ``mask``, ``split``; paths absolute or
            relative to the working directory).
        split: ``"train"``, ``"val"``, ``"test"``, or ``None`` for every row.
        phrase: the text prompt of the single object per frame (e.g. ``"blood vessel"``).

    Returns:
        One dict per frame, in manifest order: ``id`` (str), ``image`` ``(H, W, 3)`` uint8 RGB,
        ``masks`` ``(1, H, W)`` uint8 0/1, ``phrases`` ``[phrase]``.

    Raises:
        ValueError: unknown split name or a missing ``split`` column.
        FileNotFoundError: a file named by the manifest is gone (the message names it).
    """
    rows = manifest
    if split is not None:
        if "split" not in manifest.columns:
            raise ValueError("manifest has no 'split' column: pass the split manifest, or split=None")
        known = set(manifest["split"].unique())
        if split not in {"train", "val", "test"}:
            raise ValueError(f"unknown split {split!r}; use 'train', 'val' or 'test' (manifest has {sorted(known)})")
        rows = manifest[manifest["split"] == split]
    samples = []
    for row in rows.itertuples(index=False):
        image_path, mask_path = Path(row.image), Path(row.mask)
        for p in (image_path, mask_path):
            if not p.is_file():
                raise FileNotFoundError(f"sample {row.id!r}: file '{p}' named by the manifest does not exist")
        image = read_rgb(image_path)
        mask = read_mask01(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"sample {row.id!r}: mask {mask.shape} and image {image.shape[:2]} differ in size")
        samples.append({"id": str(row.id), "image": image, "masks": mask[None].astype(np.uint8), "phrases": [phrase]})
    return samples


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
