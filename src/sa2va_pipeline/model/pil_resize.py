"""Pillow's bicubic ``Image.resize`` of uint8 images in torch, bit-identical, on any device, batched.

Prediction resizes every frame twice (SAM2 input, InternVL tiles); on the host that caps throughput, on the
GPU it is nearly free, but only if the pixels stay the official ones (PIL). Pillow's 8-bit resampling
(``libImaging/Resample.c``) is integer arithmetic once its coefficients are known, so it can be replayed
exactly:

- two separable passes, each only when its size changes, each rounding and clipping to uint8; horizontal
  first, except (Pillow >= 13, python-pillow/Pillow#9549) when the height shrinks by more than twice as many
  pixels as the width does: then vertical first (:func:`vertical_first`);
- output pixel ``i`` of a pass over ``n_in`` -> ``n_out`` samples: ``scale = n_in / n_out``, the filter is
  stretched by ``max(scale, 1)`` (bicubic, a = -0.5, support 2), centred at ``(i + 0.5) * scale``; its taps
  are the inputs ``[int(centre - support + 0.5), int(centre + support + 0.5))`` clipped to the image; the
  tap weights (float64) are divided by their sum, then turned into fixed point with 22 fractional bits
  (``PRECISION_BITS = 32 - 8 - 2``, rounded half away from zero);
- a pass is ``(2**21 + sum(pixel * weight)) >> 22`` clipped to [0, 255], in 32-bit integers.

The coefficient tables are computed once per (input size, output size) on the host, in float64 with
Pillow's operation order (so the same IEEE results), and cached per device. On the device a pass is a loop
over the few taps: gather, int32 multiply, accumulate. :func:`pass_taps` proves per table that int32 cannot
overflow.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
BICUBIC_SUPPORT = 2.0
_ROUNDING = 1 << (PRECISION_BITS - 1)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5) in its operation order, float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def pass_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices int64 [out_size, K] and fixed-point weights int32 [out_size, K] of one resampling pass.

    Unused taps point at a used input with weight 0. Raises ``ValueError`` for a size below 1 or a table
    whose sums could overflow int32 (none does for bicubic: |weights| sum to < 2, 8 + 22 bits < 31).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates toward zero; a negative start is clipped to 0 right after anyway
    xmin = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - xmin  # taps used
    offsets = np.arange(ksize, dtype=np.int64)
    used = offsets[None, :] < xmax[:, None]
    weights = _bicubic(((offsets[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale))
    weights = np.where(used, weights, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # Pillow sums the taps in order (numpy's pairwise sum could round differently)
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    width = int(max(xmax.max(), 1))  # trailing taps no output uses: dropped
    fixed, used = fixed[:, :width], used[:, :width]
    index = np.where(used, xmin[:, None] + offsets[None, :width], xmin[:, None])
    high = _ROUNDING + 255 * np.clip(fixed, 0, None).sum(1)
    low = _ROUNDING + 255 * np.clip(fixed, None, 0).sum(1)
    if high.max() >= 2**31 or low.min() < -(2**31):
        raise ValueError(f"bicubic {in_size} -> {out_size}: int32 accumulation could overflow")
    return index, fixed.astype(np.int32)


_DEVICE_TAPS: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def device_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pass_taps` as tensors on ``device`` (cached: uploaded once per sizes and device)."""
    key = (in_size, out_size, str(device))
    if key not in _DEVICE_TAPS:
        index, weight = pass_taps(in_size, out_size)
        _DEVICE_TAPS[key] = (
            torch.from_numpy(index).to(device),
            torch.from_numpy(weight).to(device),
        )
    return _DEVICE_TAPS[key]


@lru_cache(maxsize=1)
def pillow_orders_passes() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks much more (13.0 does,
    older ones always go horizontal first). Asked of Pillow itself, once, on a 30x10 -> 4x8 resize whose two
    orders give different pixels."""
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (30, 10), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(image).resize((8, 4), Image.BICUBIC))
    pixels = torch.from_numpy(image)
    horizontal_first = _resample_pass(_resample_pass(pixels, 8, -1), 4, -2).numpy()
    vertical_first = _resample_pass(_resample_pass(pixels, 4, -2), 8, -1).numpy()
    if not (np.array_equal(ref, horizontal_first) ^ np.array_equal(ref, vertical_first)):
        raise RuntimeError(f"Pillow {Image.__version__} resizes in neither pass order this module knows")
    return bool(np.array_equal(ref, vertical_first))


def vertical_first(in_height: int, in_width: int, height: int, width: int) -> bool:
    """Whether Pillow resamples vertically first for this resize (both passes needed): the height shrinks
    by more than twice the pixels the width loses (found by probing Pillow 13.0; its heuristic for cheaper
    resizes of tall images), and the installed Pillow has that rule."""
    shrinks_much_more = height < in_height and in_height - height > 2 * (in_width - width)
    return shrinks_much_more and pillow_orders_passes()


def _resample_pass(pixels: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One pass along ``dim`` (-1: width, -2: height) of uint8 ``pixels``; uint8 result."""
    if dim == -1:  # gathering whole rows is several times faster than gathering along the last axis
        rows = _resample_pass(pixels.transpose(-1, -2).contiguous(), out_size, -2)
        return rows.transpose(-1, -2).contiguous()
    index, weight = device_taps(pixels.shape[-2], out_size, pixels.device)
    acc = torch.full((*pixels.shape[:-2], out_size, pixels.shape[-1]), _ROUNDING, dtype=torch.int32,
                     device=pixels.device)  # fmt: skip
    for k in range(index.shape[1]):
        acc.addcmul_(pixels.index_select(-2, index[:, k]), weight[:, k, None])  # uint8 * int32 -> int32
    acc.bitwise_right_shift_(PRECISION_BITS)  # arithmetic shift: floor, as Pillow's clip8
    return acc.clamp_(0, 255).to(torch.uint8)


def resize_bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``PIL.Image.resize((width, height), Image.BICUBIC)`` of uint8 images ``[..., H, W]`` (channels first,
    any leading batch/channel dimensions), bit for bit, on the tensor's device: uint8 ``[..., height, width]``.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"resize_bicubic takes uint8 pixels, got {pixels.dtype}")
    if pixels.ndim < 2:
        raise ValueError(f"resize_bicubic takes [..., H, W] pixels, got shape {tuple(pixels.shape)}")
    in_height, in_width = pixels.shape[-2:]
    passes = [(width, -1), (height, -2)]  # Pillow skips a pass whose size does not change
    if in_height != height and in_width != width and vertical_first(in_height, in_width, height, width):
        passes.reverse()
    out = pixels
    for size, dim in passes:
        if out.shape[dim] != size:
            out = _resample_pass(out, size, dim)
    return out if out is not pixels else pixels.clone()
