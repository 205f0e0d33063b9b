"""Image and mask preprocessing of Sa2VA, written with PIL/numpy/torch (no torchvision).

Matches the official inference code:
- InternVL tiles: ``dynamic_preprocess`` (448 tiles, at most 12, a thumbnail when more than one tile), PIL
  bicubic resizes, then /255 and ImageNet mean/std.
- SAM2 input: PIL ``resize((S, S))`` (bicubic), /255, ImageNet mean/std. The official inference code runs
  this normalisation with constants cast to bf16 (``sam2_constants="bf16"``); training uses the exact
  values (``"exact"``).

The ``*_torch`` twins (:func:`sam2_uint8_torch`, :func:`vit_tiles_uint8_torch`) give the same uint8 pixels bit
for bit from a batch of same-size images on any torch device (:mod:`.pil_resize`); prediction on a GPU uses
them so that the host only decodes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_pil_rgb(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    """Accept a PIL image, an HxW / HxWx3 uint8 array or an image file path; return an RGB PIL image."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return Image.fromarray(rgb_array(image), mode="RGB")


def rgb_array(image: Image.Image | np.ndarray | str | Path) -> np.ndarray:
    """The HxWx3 uint8 pixels :func:`to_pil_rgb` gives (arrays are not copied through PIL)."""
    if isinstance(image, (str, Path, Image.Image)):
        return np.asarray(to_pil_rgb(image))
    array = _checked_array(image)
    return np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]


def image_size(image: Image.Image | np.ndarray | str | Path) -> tuple[int, int]:
    """(width, height) of what :func:`to_pil_rgb` accepts, without converting the pixels (a file: its header)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.size
    if isinstance(image, Image.Image):
        return image.size
    height, width = _checked_array(image).shape[:2]
    return width, height


def _checked_array(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"Image arrays must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"Expected an HxW or HxWx3 image array, got shape {array.shape}")
    return array


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The official InternVL grid choice: closest aspect ratio; ties go to the larger grid if the image is
    big.
    """
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


@functools.lru_cache(maxsize=1024)
def tile_grid(
    width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """Grid (columns, rows) that ``dynamic_preprocess`` picks for an image of this size (remembered: frames
    of a dataset share a few sizes)."""
    target_ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda x: x[0] * x[1],
    )
    return find_closest_aspect_ratio(width / height, target_ratios, width, height, image_size)


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Split an image into image_size tiles on the official dynamic grid (+ a thumbnail when > 1 tile)."""
    cols, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 ``(x / 255 - mean) / std``, on the pixels' device.

    The same float32 operations in the same order on any device, so normalising on the GPU gives the
    bits the CPU gives (prediction uploads uint8 pixels, a quarter of the bytes, and normalises there).
    """
    # A tensor divisor, not the Python scalar 255: CUDA turns division by a CPU scalar into multiplication by
    # its reciprocal, which rounds differently from the CPU's true division (and the official ToTensor).
    x = pixels.float() / torch.tensor(255.0, device=pixels.device)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x - m) / s


def _hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    if not array.flags.writeable:  # np.asarray(PIL image) is read-only; torch wants writable memory
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).movedim(-1, -3)


def sam2_constants(
    constants: Literal["exact", "bf16"] = "exact",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """SAM2 mean/std: exact (training) or cast to bf16 and back (the official inference code)."""
    if constants == "exact":
        return IMAGENET_MEAN, IMAGENET_STD
    if constants == "bf16":
        mean, std = (
            tuple(torch.tensor(v).to(torch.bfloat16).float().tolist()) for v in (IMAGENET_MEAN, IMAGENET_STD)
        )
        return mean, std
    raise ValueError(f"constants must be 'exact' or 'bf16', got {constants!r}")


def vit_tiles_uint8(
    image: Image.Image | np.ndarray, image_size: int = 448, max_num: int = 12, use_thumbnail: bool = True
) -> np.ndarray:
    """InternVL tiles of one image, not yet normalised: uint8 [n_tiles, image_size, image_size, 3]."""
    tiles = dynamic_preprocess(to_pil_rgb(image), 1, max_num, image_size, use_thumbnail)
    # The official transform resizes each tile to (image_size, image_size) again: a no-op on these tiles.
    return np.stack([np.asarray(t) for t in tiles])


def vit_pixel_values(
    image: Image.Image | np.ndarray, image_size: int = 448, max_num: int = 12, use_thumbnail: bool = True
) -> torch.Tensor:
    """InternVL input of one image: float32 [n_tiles, 3, image_size, image_size]."""
    tiles = vit_tiles_uint8(image, image_size, max_num, use_thumbnail)
    return normalize(_hwc_to_chw(tiles), IMAGENET_MEAN, IMAGENET_STD)


def sam2_uint8(image: Image.Image | np.ndarray, size: int = 1024) -> np.ndarray:
    """SAM2 input of one image, not yet normalised: uint8 [size, size, 3] (PIL bicubic, aspect not kept)."""
    return np.asarray(to_pil_rgb(image).resize((size, size), Image.BICUBIC))


def sam2_pixel_values(
    image: Image.Image | np.ndarray, size: int = 1024, constants: Literal["exact", "bf16"] = "exact"
) -> torch.Tensor:
    """SAM2 input of one image: float32 [3, size, size]; aspect ratio is not kept (as the official code)."""
    return normalize(_hwc_to_chw(sam2_uint8(image, size)), *sam2_constants(constants))


def _check_batch(pixels: torch.Tensor) -> None:
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")


def sam2_uint8_torch(pixels: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """:func:`sam2_uint8` of a batch of same-size images uint8 [B, 3, H, W] on their device: [B, 3, S, S]."""
    from .pil_resize import resize_bicubic

    _check_batch(pixels)
    return resize_bicubic(pixels, size, size)


def vit_tiles_uint8_torch(
    pixels: torch.Tensor, image_size: int = 448, max_num: int = 12, use_thumbnail: bool = True
) -> torch.Tensor:
    """:func:`vit_tiles_uint8` of a batch of same-size images uint8 [B, 3, H, W] on their device:
    uint8 [B, n_tiles, 3, image_size, image_size] (the same grid for all: it depends on the size alone)."""
    from .pil_resize import resize_bicubic

    _check_batch(pixels)
    b, height, width = pixels.shape[0], pixels.shape[2], pixels.shape[3]
    cols, rows = tile_grid(width, height, 1, max_num, image_size)
    resized = resize_bicubic(pixels, image_size * rows, image_size * cols)
    # tile i is row i // cols, column i % cols (dynamic_preprocess's crop order)
    tiles = resized.reshape(b, 3, rows, image_size, cols, image_size).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, rows * cols, 3, image_size, image_size)
    if use_thumbnail and rows * cols != 1:
        thumbnail = resize_bicubic(pixels, image_size, image_size)
        tiles = torch.cat([tiles, thumbnail[:, None]], dim=1)
    return tiles


def mask_to_tensor(mask: np.ndarray | torch.Tensor | Image.Image) -> torch.Tensor:
    """A binary mask (any of bool/uint8 0-1/0-255 arrays or a PIL image) as a float32 [H, W] tensor of 0/1."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    tensor = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if tensor.ndim == 3:
        tensor = tensor[..., 0] if tensor.shape[-1] in (1, 3, 4) else tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"Expected a 2-D mask, got shape {tuple(tensor.shape)}")
    return (tensor > 0).float() if tensor.dtype == torch.bool or tensor.max() <= 1 else (tensor > 127).float()


def resize_masks_area(masks: torch.Tensor, size: int, threshold: float = 0.5) -> torch.Tensor:
    """Shrink binary masks [N, H, W] to [N, size, size] by area averaging and a >= threshold cut.

    Area resizing keeps thin (1-px) structures better than nearest-neighbour shrinking (DESIGN section 7).
    Enlarging falls back to nearest.
    """
    masks = masks.float()[:, None]
    if masks.shape[-2] >= size and masks.shape[-1] >= size:
        resized = F.interpolate(masks, size=(size, size), mode="area")
    else:
        resized = F.interpolate(masks, size=(size, size), mode="nearest")
    return (resized[:, 0] >= threshold).float()


# ---------------------------------------------------------------------------------------------------------
# Qwen-VL family (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B): native-resolution patches instead of tiles.
# As transformers' Qwen2VLImageProcessor: resize to a multiple of patch * merge ("smart resize", PIL bicubic),
# /255, mean/std, the frame repeated to the temporal patch size, then cut into patches in merge order.
# Sa2VA passes min/max pixels of 512 / 2048 * 28 * 28 for single images (training and inference).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_VL_MIN_PIXELS = 512 * 28 * 28
QWEN_VL_MAX_PIXELS = 2048 * 28 * 28


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int = QWEN_VL_MIN_PIXELS,
    max_pixels: int = QWEN_VL_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` near the original aspect ratio, with a pixel count
    within [min_pixels, max_pixels] (the Qwen2-VL rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"Image aspect ratio must be below 200, got {max(height, width) / min(height, width):.1f}"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen_vl_patches_uint8(
    image: Image.Image | np.ndarray | str | Path,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = QWEN_VL_MIN_PIXELS,
    max_pixels: int = QWEN_VL_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL patches of one image, not yet normalised: uint8 [gh * gw, 3 * T * P * P] and
    ``image_grid_thw`` [1, 3] (see :func:`qwen_vl_pixel_values`)."""
    pil = to_pil_rgb(image)
    factor = patch_size * merge_size
    h, w = smart_resize(pil.height, pil.width, factor, min_pixels, max_pixels)
    pixels = _hwc_to_chw(np.asarray(pil.resize((w, h), Image.BICUBIC)))  # [3, h, w]
    return _qwen_vl_patchify(pixels, patch_size, merge_size, temporal_patch_size)


def _qwen_vl_patchify(
    pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized pixels [3, h, w] -> patches [gh * gw, 3 * T * P * P] in merge order, ``image_grid_thw``."""
    h, w = pixels.shape[-2:]
    frames = pixels[None].expand(temporal_patch_size, -1, -1, -1)  # one image = T identical frames
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    patches = frames.reshape(1, temporal_patch_size, 3, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(
        0, 3, 6, 4, 7, 2, 1, 5, 8
    )  # grid_t, row blocks, col blocks, in-block, C, T, P, P
    flat = patches.reshape(gh * gw, 3 * temporal_patch_size * p * p).contiguous()
    return flat, torch.tensor([[1, gh, gw]])


def qwen_vl_patches_uint8_torch(
    pixels: torch.Tensor,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = QWEN_VL_MIN_PIXELS,
    max_pixels: int = QWEN_VL_MAX_PIXELS,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`qwen_vl_patches_uint8` of a batch of same-size images uint8 [B, 3, H, W] on their device: one
    (patches on the device, ``image_grid_thw`` on the host) per image."""
    from .pil_resize import resize_bicubic

    _check_batch(pixels)
    h, w = smart_resize(pixels.shape[2], pixels.shape[3], patch_size * merge_size, min_pixels, max_pixels)
    resized = resize_bicubic(pixels, h, w)
    return [_qwen_vl_patchify(image, patch_size, merge_size, temporal_patch_size) for image in resized]


def normalize_qwen_vl_patches(
    patches: torch.Tensor, mean: Sequence[float], std: Sequence[float], patch_size: int
) -> torch.Tensor:
    """uint8 patches [n, 3 * T * P * P] (channel-major rows) -> normalised float32 patches, same shape."""
    n = patches.shape[0]
    return normalize(patches.reshape(n, 3, -1, patch_size), mean, std).reshape(n, -1)


def qwen_vl_pixel_values(
    image: Image.Image | np.ndarray | str | Path,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
    min_pixels: int = QWEN_VL_MIN_PIXELS,
    max_pixels: int = QWEN_VL_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL input of one image: float32 patches [gh * gw, 3 * T * P * P] and ``image_grid_thw`` [1, 3].

    Qwen2.5-VL: patch 14, CLIP mean/std; Qwen3-VL: patch 16, mean/std 0.5. The image takes
    ``gh * gw / merge_size**2`` ``<|image_pad|>`` tokens.
    """
    patches, grid = qwen_vl_patches_uint8(
        image, patch_size, merge_size, temporal_patch_size, min_pixels, max_pixels
    )
    return normalize_qwen_vl_patches(patches, mean, std, patch_size), grid
