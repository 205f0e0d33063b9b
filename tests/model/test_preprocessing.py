"""Preprocessing matches the official algorithm: tile grids, thumbnail, SAM2 input, mask shrinking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sa2va_pipeline.model.preprocessing import (
    dynamic_preprocess,
    resize_masks_area,
    sam2_pixel_values,
    tile_grid,
    vit_pixel_values,
)


@pytest.mark.parametrize(
    ("size", "grid", "n_tiles"),
    [
        ((512, 512), (1, 1), 1),
        ((640, 480), (4, 3), 13),
        ((448, 448), (1, 1), 1),
        ((1000, 200), (5, 1), 6),
        ((896, 448), (2, 1), 3),
    ],
)
def test_tile_grid_and_count(size, grid, n_tiles):
    w, h = size
    assert tile_grid(w, h) == grid
    tiles = dynamic_preprocess(Image.new("RGB", (w, h)), max_num=12, image_size=448, use_thumbnail=True)
    assert len(tiles) == n_tiles
    assert all(t.size == (448, 448) for t in tiles)


def test_vit_pixel_values_normalised():
    image = np.full((512, 512, 3), 255, dtype=np.uint8)
    pv = vit_pixel_values(image)
    assert pv.shape == (1, 3, 448, 448)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(pv[0, :, 10, 10], expected, atol=1e-6)


def test_sam2_constants_bf16_vs_exact():
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    exact = sam2_pixel_values(image, size=128, constants="exact")
    bf16 = sam2_pixel_values(image, size=128, constants="bf16")
    assert exact.shape == (3, 128, 128)
    assert torch.allclose(
        exact[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    )
    assert torch.allclose(
        bf16[:, 0, 0],
        -torch.tensor([0.484375, 0.455078125, 0.40625])
        / torch.tensor([0.228515625, 0.2236328125, 0.224609375]),
    )


def test_area_resize_keeps_one_pixel_vessels():
    mask = torch.zeros(1, 512, 512)
    mask[0, :, 101:103] = 1  # a 2-px vessel: half of each 2x2 block after shrinking to 256
    mask[0, :, 300] = 1  # a 1-px vessel spans half a block column only at 256 if aligned
    out = resize_masks_area(mask, 256)
    assert out.shape == (1, 256, 256)
    assert out[0, :, 50:52].sum() > 0  # nearest could drop it, area >= 0.5 keeps it
    assert out[0, :, 150].all()


def test_images_from_paths_arrays_and_grey(tmp_path):
    from sa2va_pipeline.model.preprocessing import to_pil_rgb

    grey = np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "frame.png")
    from_path = to_pil_rgb(tmp_path / "frame.png")
    from_array = to_pil_rgb(grey)
    assert from_path.mode == from_array.mode == "RGB" and from_path.size == (64, 48)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_array))
    with pytest.raises(TypeError, match="uint8"):
        to_pil_rgb(grey.astype(np.float32))


@pytest.mark.parametrize(("patch", "mean"), [(14, None), (16, (0.5, 0.5, 0.5))])
@pytest.mark.parametrize(("h", "w"), [(512, 512), (300, 1000), (97, 61), (2000, 1500)])
def test_qwen_vl_patches_equal_transformers_processor(patch, mean, h, w):
    """Qwen2.5-VL (patch 14, CLIP mean/std) and Qwen3-VL (patch 16, 0.5): bit-identical to transformers'
    Qwen2VLImageProcessorPil with Sa2VA's single-image min/max pixels."""
    import warnings

    from sa2va_pipeline.model.preprocessing import qwen_vl_pixel_values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        norm = {"image_mean": list(mean), "image_std": list(mean)} if mean else {}
        proc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, **norm)
        image = np.random.RandomState(h).randint(0, 256, (h, w, 3), dtype=np.uint8)
        expected = proc(images=[Image.fromarray(image)], min_pixels=512 * 28 * 28, max_pixels=2048 * 28 * 28)
    ours, grid = qwen_vl_pixel_values(image, patch, **({"mean": mean, "std": mean} if mean else {}))
    assert torch.equal(grid, torch.as_tensor(expected["image_grid_thw"]))
    assert torch.equal(ours, torch.as_tensor(np.asarray(expected["pixel_values"])))
    pixels = int(grid[0, 1] * grid[0, 2]) * patch * patch  # the resized image's area, within Sa2VA's limits
    assert 512 * 28 * 28 <= pixels <= 2048 * 28 * 28
