"""Shared fixtures of the model tests: one tiny model per session (tests must not mutate it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from sa2va_pipeline.model import Sa2VA

    torch.set_num_threads(2)
    return Sa2VA.from_preset("tiny")


def _image(seed: int, h: int = 512, w: int = 512) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(seed: int, h: int = 512, w: int = 512) -> np.ndarray:
    rs = np.random.RandomState(seed + 1000)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, rs.randint(0, w)] = 1  # a 1-px vessel
    mask[rs.randint(0, h // 2) :, : w // 3] = 1
    return mask


@pytest.fixture(scope="session")
def make_image():
    """make_image(seed, h=512, w=512): a deterministic random RGB uint8 image."""
    return _image


@pytest.fixture(scope="session")
def make_mask():
    """make_mask(seed, h=512, w=512): a deterministic binary mask with a 1-px vessel and a block."""
    return _mask
