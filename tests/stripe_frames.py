"""Tiny training samples shared by the multi-device and compile tests: 64x64 grey frames with one dark
vertical vessel stripe at a random column, and its mask."""

from __future__ import annotations

import numpy as np


def stripe_samples(
    n: int, seed: int = 0, width: int = 4, background: int = 160, vessel: int = 60, prefix: str = "f"
) -> list[dict]:
    """``n`` samples (``id``, ``image`` HxWx3 uint8, ``masks`` [1, H, W], ``phrases``), deterministic per seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, rng.integers(5, 55) :][:, :width] = 1
        image = np.full((64, 64, 3), background, np.uint8)
        image[mask > 0] = vessel
        out.append({"id": f"{prefix}{i}", "image": image, "masks": mask[None], "phrases": ["blood vessel"]})
    return out
