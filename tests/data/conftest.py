"""Fixtures of the data-chain tests: tiny raw folders written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def make_raw(tmp_path: Path):
    """Factory: ``make_raw({relative path: bytes})`` writes a raw folder and returns its path."""

    def _make(files: dict[str, bytes], name: str = "raw") -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return root

    return _make


@pytest.fixture
def rgb32() -> np.ndarray:
    """A 32x32 RGB frame with some texture."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
