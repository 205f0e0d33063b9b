"""The torch bicubic resize is Pillow's, bit for bit: single passes, both pass orders, clipping, batches, and
the whole prediction preprocessing (SAM2 frame, InternVL tiles + thumbnail, Qwen-VL patches, normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va_pipeline.model.pil_resize import pass_taps, resize_bicubic, vertical_first
from sa2va_pipeline.model.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    qwen_vl_patches_uint8,
    qwen_vl_patches_uint8_torch,
    rgb_array,
    sam2_constants,
    sam2_pixel_values,
    sam2_uint8,
    sam2_uint8_torch,
    vit_pixel_values,
    vit_tiles_uint8,
    vit_tiles_uint8_torch,
)


def _pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def _torch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return resize_bicubic(torch.from_numpy(image).permute(2, 0, 1), height, width).permute(1, 2, 0).numpy()


def _images(h: int, w: int, seed: int) -> list[np.ndarray]:
    """Random pixels, and a 0/255 checkerboard (the largest overshoot: exercises the clipping)."""
    random = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.indices((h, w))
    checker = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    checker[..., 1] = 255 - checker[..., 1]
    return [random, checker]


@pytest.mark.parametrize(
    ("size", "out"),
    [
        ((512, 512), (1024, 1024)),  # SAM2 input of a sample frame
        ((512, 512), (448, 448)),  # its one InternVL tile
        ((1024, 1024), (448, 448)),  # the thumbnail of a 1024 frame
        ((1024, 1024), (1344, 1344)),  # its 3x3 tile grid
        ((480, 640), (1344, 1792)),  # non-square up
        ((333, 517), (1024, 1024)),  # odd sizes
        ((301, 997), (448, 2240)),
        ((2000, 300), (1024, 1024)),  # height shrinks, width grows: Pillow 13 goes vertical first
        ((37, 91), (5, 200)),
        ((1, 1), (3, 4)),
        ((9, 4), (1, 1)),
        ((100, 100), (100, 37)),  # one pass only
        ((100, 100), (37, 100)),
    ],
)
def test_resize_equals_pillow_exactly(size, out):
    images = _images(*size, seed=size[0] + out[1])
    for image in images if max(*size, *out) <= 1024 else images[:1]:  # the checkerboard again on small ones
        np.testing.assert_array_equal(_torch(image, *out), _pil(image, *out))


def test_resize_equals_pillow_on_random_sizes_and_both_pass_orders():
    rng = np.random.default_rng(11)
    orders = set()
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        oh, ow = (int(v) for v in rng.integers(1, 120, 2))
        image = _images(h, w, seed=trial)[trial % 2]
        orders.add(vertical_first(h, w, oh, ow))
        got, want = _torch(image, oh, ow), _pil(image, oh, ow)
        assert np.array_equal(got, want), f"{h}x{w} -> {oh}x{ow}"
    assert orders == {True, False}


def test_resize_is_batched_over_leading_dimensions_and_leaves_its_input():
    images = np.stack(_images(50, 70, seed=3) + _images(50, 70, seed=4))  # [4, 50, 70, 3]
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    before = batch.clone()
    out = resize_bicubic(batch, 91, 33)
    assert out.shape == (4, 3, 91, 33) and out.dtype == torch.uint8
    for i, image in enumerate(images):
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), _pil(image, 91, 33))
    assert torch.equal(batch, before)
    same = resize_bicubic(batch, 50, 70)
    assert torch.equal(same, batch) and same.data_ptr() != batch.data_ptr()  # Pillow returns a copy


def test_taps_fit_int32_and_refuse_bad_sizes():
    index, weight = pass_taps(512, 1024)
    assert index.shape == weight.shape and weight.dtype == np.int32
    assert (weight.sum(1) - (1 << 22)).__abs__().max() <= weight.shape[1]  # weights sum to one in fixed point
    for n_in, n_out in [(4096, 7), (7, 4096), (1, 1)]:
        pass_taps(n_in, n_out)  # the int32 overflow check passes
    with pytest.raises(ValueError, match="sizes"):
        pass_taps(0, 5)
    with pytest.raises(TypeError, match="uint8"):
        resize_bicubic(torch.zeros(3, 4, 4), 2, 2)


def _batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb_array(image)).permute(2, 0, 1)[None].contiguous()


@pytest.mark.parametrize("size", [(512, 512), (480, 640), (200, 1000), (1024, 1024), (77, 45)])
def test_prediction_preprocessing_equals_the_pil_path_exactly(size):
    image = _images(*size, seed=sum(size))[0]
    batch = _batch(image)
    # SAM2 frame: uint8, then the official bf16-constant normalisation
    sam2 = sam2_uint8_torch(batch, 1024)
    np.testing.assert_array_equal(sam2[0].permute(1, 2, 0).numpy(), sam2_uint8(image, 1024))
    assert torch.equal(normalize(sam2, *sam2_constants("bf16"))[0], sam2_pixel_values(image, 1024, "bf16"))
    # InternVL tiles on the dynamic grid (+ thumbnail when more than one)
    tiles = vit_tiles_uint8_torch(batch)
    np.testing.assert_array_equal(tiles[0].permute(0, 2, 3, 1).numpy(), vit_tiles_uint8(image))
    assert torch.equal(normalize(tiles[0], IMAGENET_MEAN, IMAGENET_STD), vit_pixel_values(image))


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (301, 77)])
def test_qwen_vl_patches_equal_the_pil_path_exactly(size):
    image = _images(*size, seed=size[1])[1]
    ((patches, grid),) = qwen_vl_patches_uint8_torch(_batch(image))
    want_patches, want_grid = qwen_vl_patches_uint8(image)
    assert torch.equal(patches, want_patches) and torch.equal(grid, want_grid)


def test_rgb_array_gives_the_pixels_of_to_pil_rgb(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    rgba = np.random.default_rng(1).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_array(gray), np.asarray(Image.fromarray(gray).convert("RGB")))
    np.testing.assert_array_equal(rgb_array(rgba), rgba[..., :3])
    path = tmp_path / "frame.png"
    Image.fromarray(rgba).save(path)
    np.testing.assert_array_equal(rgb_array(path), rgba[..., :3])
    with pytest.raises(TypeError, match="uint8"):
        rgb_array(gray.astype(np.float32))
