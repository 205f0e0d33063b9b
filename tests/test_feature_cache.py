"""Feature cache of the frozen encoders: cached and uncached training give the same loss; stale caches are
never read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sa2va_pipeline.training.feature_cache import FeatureCache, cacheable_parts, image_digest


@pytest.fixture(scope="module")
def model():
    from sa2va_pipeline.model import Sa2VA

    torch.manual_seed(0)
    return Sa2VA.from_preset("tiny", sam2_image_size=64).eval()


def _samples(n: int = 3) -> list[tuple[np.ndarray, np.ndarray, str]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        mask = (rng.random((48, 48)) > 0.7).astype(np.uint8)
        out.append((image, mask, "blood vessel"))
    return out


def _loss(model, batch) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model.training_forward(batch, generator=gen)


def test_cached_loss_matches_uncached_fp32_and_bf16(model, tmp_path):
    samples = _samples()
    images = [s[0] for s in samples]
    reference = _loss(model, model.collate(samples, seed=1))
    for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        cache = FeatureCache(tmp_path / dtype, model, storage_dtype=dtype)
        assert cache.fill(images, batch_size=2) == 3
        assert cache.fill(images) == 0  # second pass: everything is cached
        batch = cache.attach(model.collate(samples, seed=1), images)
        assert "pixel_values" not in batch and "sam2_pixel_values" not in batch
        cached = _loss(model, batch)
        for key in ("llm", "mask_bce", "mask_dice", "total"):
            assert torch.allclose(cached[key], reference[key], rtol=tol, atol=tol), (dtype, key, cached, reference)
    from safetensors.torch import load_file

    for dtype, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cache = FeatureCache(tmp_path / dtype, model, storage_dtype=dtype)
        stored = load_file(str(cache.path("sam2", image_digest(images[0]))))
        assert {t.dtype for t in stored.values()} == {expected} and len(stored) == 3


def test_stale_cache_is_never_used(model, tmp_path):
    images = [s[0] for s in _samples(2)]
    cache = FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="fp32")
    cache.fill(images)
    # other weights of the encoder -> another folder, nothing cached there yet
    tower = model.vlm.model.vision_tower
    with torch.no_grad():
        first = next(tower.parameters())
        first.add_(1e-3)
        try:
            changed = FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="fp32")
            assert changed.dirs["vit"] != cache.dirs["vit"]
            assert changed.missing(images) == [0, 1]
            with pytest.raises(FileNotFoundError, match="fill"):
                changed.load(images)
        finally:
            first.sub_(1e-3)
    # other preprocessing or storage dtype -> another folder too
    assert FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="bf16").dirs["vit"] != cache.dirs["vit"]
    model.max_dynamic_patch, saved = 6, model.max_dynamic_patch
    try:
        assert FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="fp32").dirs["vit"] != cache.dirs["vit"]
    finally:
        model.max_dynamic_patch = saved
    # same everything -> same folder, all cached
    assert FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="fp32").missing(images) == []


def test_partial_cache_and_helpers(model, tmp_path):
    assert cacheable_parts(vision_tower_trains=False, sam2_encoder_trains=True) == ("vit",)
    assert cacheable_parts(True, True) == ()
    samples = _samples(2)
    images = [s[0] for s in samples]
    cache = FeatureCache(tmp_path, model, parts=("vit",), storage_dtype="fp32")
    cache.fill(images)
    batch = cache.attach(model.collate(samples, seed=0), images)
    assert "pixel_values" not in batch and "sam2_pixel_values" in batch  # SAM2 still runs (it trains)
    assert image_digest(images[0]) != image_digest(images[1])
    assert image_digest(images[0]) == image_digest(images[0].copy())
    with pytest.raises(ValueError, match="dtype"):
        FeatureCache(tmp_path, model, storage_dtype="fp16")


def test_keep_in_memory_auto_holds_the_features_only_when_they_fit(model, tmp_path, monkeypatch):
    import sa2va_pipeline.training.feature_cache as fc

    images = [im for im, _, _ in _samples(2)]
    need = None
    for available, expected in [(10**12, True), (1, False), (None, False)]:
        cache = FeatureCache(tmp_path, model, storage_dtype="fp32", keep_in_memory="auto")
        cache.fill(images)
        monkeypatch.setattr(fc, "available_memory_bytes", lambda a=available: a)
        assert cache.settle_memory(images) is expected
        if expected:
            first = cache.load(images)
            need = sum(p.stat().st_size for d in cache.dirs.values() for p in d.glob("*.safetensors"))
            for path in [p for d in cache.dirs.values() for p in d.glob("*.safetensors")]:
                path.unlink()  # held in memory: the files are not read again
            again = cache.load(images)
            assert torch.equal(first["vit_features"], again["vit_features"])
    assert need and FeatureCache(tmp_path, model, keep_in_memory=True).settle_memory([]) is True
    with pytest.raises(ValueError, match="keep_in_memory"):
        FeatureCache(tmp_path, model, keep_in_memory="yes")
