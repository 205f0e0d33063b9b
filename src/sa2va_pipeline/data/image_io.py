"""Reading and writing images and masks by bytes, so any file name works (spaces, parentheses, carets,
non-ASCII) on every platform: we never hand a path to ``cv2.imread``.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Decompression-bomb guard stays on, but real angiography frames are far below it.
Image.MAX_IMAGE_PIXELS = 200_000_000

# The image file types every reader of this project accepts (ingestion, inference), lower-case.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (files written by ingestion are already RGB)."""
    with Image.open(io.BytesIO(Path(path).read_bytes())) as img:
        return np.asarray(img.convert("RGB"))


def read_mask01(path: str | Path) -> np.ndarray:
    """Read a binary mask PNG (0/255 or 0/1) as ``(H, W)`` uint8 0/1."""
    with Image.open(io.BytesIO(Path(path).read_bytes())) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return (arr > 0).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Encode ``(H, W)`` gray or ``(H, W, 3)`` RGB uint8 as PNG bytes."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 only fails on unsupported dtypes, which we never pass
        raise ValueError(f"could not encode an array of shape {array.shape} as PNG")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Encode ``(H, W, 3)`` RGB or ``(H, W)`` gray uint8 as JPEG bytes at ``quality`` (1-100)."""
    if rgb.ndim == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", rgb, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover
        raise ValueError("could not encode the frame as JPEG")
    return buf.tobytes()

