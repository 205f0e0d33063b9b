"""Reading and writing images and masks by bytes, so any file name works (spaces, parentheses, carets,
non-ASCII) on every platform: we never hand a path to ``cv2.imread``.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# PIL's own decompression-bomb guard keeps its default (a warning above ~89M pixels, an error above
# ~179M); every reader of this module also checks the header against ``max_pixels`` BEFORE decoding.
# 64M pixels is far above a 4k x 4k frame (16.8M) and far below the 400M a 20000 x 20000 header claims.
DEFAULT_MAX_PIXELS = 64_000_000

# The image file types every reader of this project accepts (ingestion, inference), lower-case.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageTooLargeError(ValueError):
    """An image whose header claims more pixels than allowed; nothing was decoded."""


def check_pixels(img: Image.Image, max_pixels: int | None, what: str = "image") -> None:
    """Refuse an opened (not yet decoded) PIL image whose header size exceeds ``max_pixels``.

    Raises:
        ImageTooLargeError: ``width * height > max_pixels`` (the message gives both numbers).
    """
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {img.width}x{img.height} = {img.width * img.height:,} pixels, above the limit of "
            f"{max_pixels:,} (ingestion.max_pixels); not decoded. Downscale it, or raise the limit if it is real."
        )


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image") -> Image.Image:
    """Open image bytes lazily with PIL and check the header's pixel count before anything is decoded."""
    img = Image.open(io.BytesIO(data))
    check_pixels(img, max_pixels, what)
    return img


def read_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (files written by ingestion are already RGB).

    Raises:
        ImageTooLargeError: the header claims more than ``max_pixels`` pixels (checked before decoding).
    """
    with open_image(Path(path).read_bytes(), max_pixels, f"image '{path}'") as img:
        return np.asarray(img.convert("RGB"))


def read_mask01(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a binary mask PNG (0/255 or 0/1) as ``(H, W)`` uint8 0/1 (header checked as in :func:`read_rgb`)."""
    with open_image(Path(path).read_bytes(), max_pixels, f"mask '{path}'") as img:
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

