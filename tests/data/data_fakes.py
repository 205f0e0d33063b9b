"""Helpers of the data-chain tests: tiny images and masks made in memory."""

from __future__ import annotations

import io
import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """PNG bytes of an array (PIL infers the mode unless given)."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(rgb: np.ndarray, exif_orientation: int | None = None) -> bytes:
    """JPEG bytes, optionally with an EXIF orientation tag."""
    buf = io.BytesIO()
    img = Image.fromarray(rgb)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def vessel_mask(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    """A small 0/1 mask with a cross and a ring."""
    m = np.zeros((h, w), np.uint8)
    m[h // 2, 2 : w - 2] = 1
    m[2 : h - 2, w // 3] = 1
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h * 0.7, xx - w * 0.7)
    m[(r > 3) & (r < 5)] = 1
    return m


