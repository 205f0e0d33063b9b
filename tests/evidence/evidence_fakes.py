"""Tiny in-memory data for the baseline and cross-validation tests: stripe frames of a few 'videos', two phrases,
a split manifest with groups, and a stand-in for the sample loader (so the tests depend only on the contract)."""

from __future__ import annotations

import numpy as np
import pandas as pd

PHRASES = ["blood vessel", "catheter"]


def frame(video: int, index: int, size: int = 32, labels: list[str] = PHRASES) -> dict:
    """A frame with a dark vertical vessel stripe and (odd frames) a brighter horizontal catheter stripe."""
    rng = np.random.default_rng(video * 100 + index)
    image = np.full((size, size, 3), 170, np.uint8)
    vessel = np.zeros((size, size), np.uint8)
    column = 4 + (3 * video + index) % (size - 10)
    vessel[:, column : column + 4] = 1
    image[vessel > 0] = 60
    masks, phrases = [vessel], [PHRASES[0]]
    if index % 2 and len(labels) > 1:
        catheter = np.zeros((size, size), np.uint8)
        catheter[size // 2 : size // 2 + 3, :] = 1
        image[catheter > 0] = 240
        masks.append(catheter)
        phrases.append(PHRASES[1])
    image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return {
        "id": f"v{video}_frame_{index}",
        "image": image,
        "masks": np.stack(masks).astype(np.uint8),
        "phrases": phrases,
    }


def dataset(
    n_videos: int = 6, frames: int = 3, size: int = 32, phrases: list[str] = PHRASES
) -> tuple[pd.DataFrame, list[dict], dict]:
    """(split manifest, annotations stand-in, samples by id); splits: 4 videos train, 1 val, 1 test."""
    samples, rows = {}, []
    splits = ["train"] * (n_videos - 2) + ["val", "test"]
    for v in range(n_videos):
        for f in range(frames):
            s = frame(v, f, size, phrases)
            samples[s["id"]] = s
            rows.append(
                {
                    "id": s["id"],
                    "image": f"/nowhere/{s['id']}.png",
                    "width": size,
                    "height": size,
                    "group": f"v{v}",
                    "status": "ok",
                    "source_image": "",
                    "split": splits[v],
                }
            )
    annotations = [
        {"image": f"{i}.png", "text": s["phrases"], "mask": [[] for _ in s["phrases"]]}
        for i, s in samples.items()
    ]
    return pd.DataFrame(rows), annotations, samples


def fake_split_samples(samples: dict):
    """A ``split_samples(split_manifest, annotations, split)`` that serves the in-memory samples."""

    def split_samples(manifest: pd.DataFrame, annotations, split):
        rows = manifest if split is None else manifest[manifest["split"] == split]
        return [dict(samples[i]) for i in rows["id"].astype(str)]

    return split_samples


def kept_memory_dataset():
    """A MemoryDataset the runner does not release after its last reader, so a test can load intermediates."""
    from kedro.io import MemoryDataset

    class Kept(MemoryDataset):
        def _release(self) -> None:
            pass

    return Kept(copy_mode="assign")
