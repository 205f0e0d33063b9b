"""Decoding raw images and masks from bytes, with the fixes ingestion applies and reports.

Every decoder checks the header's pixel count against a limit BEFORE decoding (a 99-byte PNG header
can claim 20000 x 20000 pixels), so a decompression bomb is a rejected file, never a memory spike.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sa2va_pipeline.data.image_io import DEFAULT_MAX_PIXELS, ImageTooLargeError, check_pixels

_EXIF_ORIENTATION = 0x0112


class BadFileError(Exception):
    """A raw file that cannot be used; the message is the report's reason."""


# ---------------------------------------------------------------------------------- decoding + fixes
def _open(data: bytes, what: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check the header's pixel count, then decode; every failure is a :class:`BadFileError`."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL refuses some headers itself, above ~179M pixels
        limit = f"{max_pixels:,}" if max_pixels is not None else "PIL's own"
        raise BadFileError(f"{what} header claims too many pixels, above the limit of {limit} (ingestion.max_pixels); "
                           f"not decoded ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadFileError(f"corrupt or unreadable {what} ({type(exc).__name__}: {exc})") from exc
    try:
        check_pixels(img, max_pixels, what)
    except ImageTooLargeError as exc:
        raise BadFileError(str(exc)) from exc
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadFileError(f"corrupt or unreadable {what} ({type(exc).__name__}: {exc})") from exc
    if img.width == 0 or img.height == 0:
        raise BadFileError(f"{what} has zero size")
    return img


def _apply_exif(img: Image.Image, fixes: list[str]) -> Image.Image:
    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        fixes.append(f"EXIF orientation {orientation} applied")
    return img


def _scale_to_uint8(arr: np.ndarray, fixes: list[str], label: str) -> np.ndarray:
    """Integer data deeper than 8 bits: scale by the smallest 2^k - 1 (k >= 8) that holds the maximum,
    so 10/12/14/16-bit data keep their contrast; floats are min-max scaled."""
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr, dtype=np.float64) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        fixes.append(f"{label} float image min-max scaled to 8-bit RGB")
        return np.nan_to_num(scaled).round().astype(np.uint8)
    top = int(arr.max()) if arr.size else 0
    bits = max(8, int(np.ceil(np.log2(top + 1))) if top > 0 else 8)
    fixes.append(f"{label} image (max {top}, scaled as {bits}-bit) converted to 8-bit RGB")
    return np.clip(np.round(arr.astype(np.float64) * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Decode image bytes to ``(H, W, 3)`` uint8 RGB; returns the array and the fixes applied.

    Raises:
        BadFileError: the bytes are not a readable image, or the header claims more than ``max_pixels``.
    """
    img = _open(data, "image", max_pixels)
    fixes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        fixes.append(f"multi-frame file ({img.n_frames} frames): first frame used")
    img = _apply_exif(img, fixes)
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), fixes
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = _scale_to_uint8(np.asarray(img), fixes, "16-bit" if mode.startswith("I;16") else mode)
        return np.repeat(gray[:, :, None], 3, axis=2), fixes
    reasons = {
        "L": "grayscale converted to RGB",
        "LA": "grayscale+alpha converted to RGB (alpha dropped)",
        "RGBA": "RGBA converted to RGB (alpha dropped)",
        "RGBa": "RGBA converted to RGB (alpha dropped)",
        "P": "palette image converted to RGB",
        "PA": "palette+alpha image converted to RGB (alpha dropped)",
        "1": "1-bit image converted to 8-bit RGB",
        "CMYK": "CMYK converted to RGB",
    }
    fixes.append(reasons.get(mode, f"{mode} image converted to RGB"))
    if mode in ("RGBA", "RGBa", "LA", "PA"):
        img = img.convert("RGBA") if mode != "LA" else img.convert("LA")
        arr = np.asarray(img)[:, :, :-1]  # drop alpha, keep the colour values as stored
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr), fixes
    return np.asarray(img.convert("RGB")), fixes


def _describe_values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:6].tolist())
    return "{" + shown + (", ..." if len(values) > 6 else "") + "}"


def decode_mask(
    data: bytes, threshold: int = 128, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[str]]:
    """Decode mask bytes to ``(H, W)`` uint8 0/1; returns the mask and the fixes applied.

    Masks already in {0, 1} or {0, 255} are taken as they are; anything else is binarised at
    ``value >= threshold`` (8-bit units; x257 for 16-bit masks, /255 for float masks).

    Raises:
        BadFileError: the bytes are not a readable image, or the header claims more than ``max_pixels``.
    """
    img = _open(data, "mask", max_pixels)
    fixes: list[str] = []
    img = _apply_exif(img, fixes)
    if img.mode in ("RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LA", "PA"):
        rgb = np.asarray(img.convert("RGB"))
        arr = rgb.max(axis=2)
        same = bool((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all())
        fixes.append(f"{img.mode} mask reduced to one channel" + ("" if same else " (max over channels)"))
    else:
        arr = np.asarray(img)  # L, 1, P (palette indices are the labels), I;16, I, F
    if arr.dtype == bool:
        return arr.astype(np.uint8), fixes
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all() or np.isin(values, (0, 255)).all():
        return (arr > 0).astype(np.uint8), fixes
    if np.issubdtype(arr.dtype, np.floating):
        level = threshold / 255.0 if float(values.max()) <= 1.0 else float(threshold)
    else:
        level = threshold * 257 if arr.dtype.itemsize > 1 and int(values.max()) > 255 else threshold
    fixes.append(f"mask values {_describe_values(values)} binarised at >= {level:g}")
    return (arr >= level).astype(np.uint8), fixes


def decode_label_map(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an integer label-map PNG (modes L, P, I;16, I) to an ``(H, W)`` integer array.

    Raises:
        BadFileError: unreadable, too large, or not a single-channel integer image (e.g. RGB).
    """
    img = _open(data, "label map", max_pixels)
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I;16N", "I", "1"):
        raise BadFileError(
            f"label map must be a single-channel integer PNG (8 or 16 bit), got mode {img.mode}; "
            "write one integer value per structure (0 = background)"
        )
    return np.asarray(img).astype(np.int64)


__all__ = ["BadFileError", "decode_image", "decode_label_map", "decode_mask"]
