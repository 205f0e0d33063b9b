"""COCO run-length encoding (RLE), decoded without pycocotools.

A COCO RLE is ``{"size": [height, width], "counts": ...}``. The mask is read in column-major order
(down the first column, then the next), and ``counts`` alternates run lengths of 0s and 1s, starting
with 0s (a mask starting with a 1 has a first count of 0). ``counts`` is either a list of integers
("uncompressed", what ``iscrowd: 1`` annotations of COCO files usually hold) or a string
("compressed", pycocotools' ``rleToString``): each count is written in 5-bit groups, least significant
first, as characters ``chr(48 + group)``; bit ``0x20`` of a group says "more groups follow", bit
``0x10`` of the last group is the sign; from the third count on, the value stored is the difference to
the count two places before. Our tests compare every decoder here with pycocotools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class RleError(ValueError):
    """A malformed RLE; the message says what is wrong (the caller adds file and annotation)."""


def counts_from_string(text: str) -> list[int]:
    """Decode a compressed COCO counts string into run lengths (pycocotools ``rleFrString``)."""
    counts: list[int] = []
    pos, n = 0, len(text)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise RleError("compressed counts string ends in the middle of a number")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise RleError(f"character {text[pos]!r} at {pos} is not part of a compressed counts string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def counts_to_string(counts: Sequence[int]) -> str:
    """Encode run lengths as a compressed COCO counts string (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not group & 0x10) or (value == -1 and group & 0x10))
            chars.append(chr(48 + (group | (0x20 if more else 0))))
    return "".join(chars)


def counts_from_mask(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a binary ``(H, W)`` mask (column-major, starting with 0s)."""
    flat = (np.asarray(mask).T.reshape(-1) != 0).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def decode_rle(rle: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Decode a COCO RLE (``counts`` a list or a compressed string) into an ``(H, W)`` uint8 0/1 mask.

    Raises:
        RleError: ``size`` differs from ``(height, width)``, counts are negative, not integers, or do not
            add up to ``height * width``.
    """
    size = rle.get("size")
    if not (isinstance(size, Sequence) and len(size) == 2 and [int(s) for s in size] == [height, width]):
        raise RleError(f"RLE size {size!r} differs from the image's [height, width] = [{height}, {width}]")
    counts = rle.get("counts")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs = counts_from_string(counts)
    elif isinstance(counts, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        runs = list(counts)
    else:
        raise RleError("RLE counts must be a list of integers (uncompressed) or a string (compressed)")
    if any(c < 0 for c in runs):
        raise RleError("RLE counts hold a negative run length")
    if sum(runs) != height * width:
        raise RleError(f"RLE counts add up to {sum(runs)} pixels, the image has {height * width}")
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


__all__ = ["RleError", "counts_from_mask", "counts_from_string", "counts_to_string", "decode_rle"]
