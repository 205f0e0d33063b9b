"""Multi-object samples (the official multi-turn format), max_objects, samples without objects, per-object
losses (issue 11 item 3)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sa2va_pipeline.model.losses import IGNORE_INDEX
from sa2va_pipeline.model.processing import choose_objects

PHRASES = ["vessel", "catheter", "stenosis"]


def _sample(make_image, make_mask, sample_id="a", n=3, seed=0):
    masks = np.stack([make_mask(seed + k) for k in range(n)]) if n else np.zeros((0, 512, 512), np.uint8)
    return {"id": sample_id, "image": make_image(seed), "masks": masks, "phrases": PHRASES[:n]}


def _turns(tiny, ids):
    """The user turns' text of one row (between '<|im_start|>user\\n' and '<|im_end|>')."""
    text = tiny.tokenizer.decode(ids)
    return [t.split("<|im_end|>")[0] for t in text.split("<|im_start|>user\n")[1:]]


def test_three_objects_are_three_turns_in_order(tiny, make_image, make_mask):
    sample = _sample(make_image, make_mask)
    forms = ["Segment {class_name}."]
    batch = tiny.collate([sample], rng=random.Random(0), answer="Sure, [SEG].", questions=forms)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    turns = _turns(tiny, ids)
    assert [t.split("\n")[-1] for t in turns] == [f"Segment {p}." for p in PHRASES]
    assert turns[0].startswith("<img>") and "</img>\n" in turns[0]  # "<image>\n" before the first question
    assert all("<img>" not in t and "<IMG_CONTEXT>" not in t for t in turns[1:])  # and only there
    assert int((ids == tiny.img_context_id).sum()) == 256  # one image (one tile at 512 x 512)
    # one [SEG] per answer, every [SEG] is trained, labels are exactly the three answers
    seg = (ids == tiny.seg_id).nonzero()[:, 0]
    assert len(seg) == 3 and (labels[seg] == tiny.seg_id).all()
    answer = tiny.tokenizer.encode("Sure, [SEG].<|im_end|>", add_special_tokens=False)
    assert labels[labels != IGNORE_INDEX].tolist() == answer * 3
    assert batch["object_phrases"] == PHRASES and batch["object_image_index"].tolist() == [0, 0, 0]
    assert batch["gt_masks"].shape == (3, tiny.mask_size, tiny.mask_size) and batch["sample_index"] == [0]


def test_max_objects_keeps_a_drawn_subset_in_the_original_order(tiny, make_image, make_mask):
    sample = _sample(make_image, make_mask)
    full = tiny.collate([sample], rng=random.Random(0), answer="Sure, [SEG].")
    seen = set()
    for seed in range(12):
        batch = tiny.collate([sample], rng=random.Random(seed), max_objects=2, answer="Sure, [SEG].")
        kept = [PHRASES.index(p) for p in batch["object_phrases"]]
        assert len(kept) == 2 and kept == sorted(kept)  # original order
        seen.add(tuple(kept))
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert int((ids == tiny.seg_id).sum()) == 2 and int((labels == tiny.seg_id).sum()) == 2
        turns_text = " ".join(_turns(tiny, ids))
        for k in range(3):
            assert (PHRASES[k] in turns_text) == (k in kept)
        # the kept masks are those objects' masks
        for row, k in enumerate(kept):
            assert torch.equal(batch["gt_masks"][row], full["gt_masks"][k])
    assert len(seen) > 1  # drawn, not always the first two
    again = [tiny.collate([sample], rng=random.Random(5), max_objects=2)["object_phrases"] for _ in range(2)]
    assert again[0] == again[1]  # deterministic given the rng
    # at most max_objects: a sample with fewer objects keeps all and draws nothing from rng
    rng_a, rng_b = random.Random(1), random.Random(1)
    tiny.collate([sample], rng=rng_a, max_objects=3, answer="Sure, [SEG].")
    tiny.collate([sample], rng=rng_b, answer="Sure, [SEG].")
    assert rng_a.random() == rng_b.random()


def test_choose_objects():
    assert choose_objects(3, None, random.Random(0)) == [0, 1, 2]
    assert choose_objects(2, 5, random.Random(0)) == [0, 1]
    assert len(choose_objects(10, 4, random.Random(0))) == 4
    with pytest.raises(ValueError, match="max_objects"):
        choose_objects(3, 0, random.Random(0))


def test_samples_without_objects_are_left_out_and_an_empty_batch_is_refused(tiny, make_image, make_mask):
    empty, two = _sample(make_image, make_mask, "empty", n=0), _sample(make_image, make_mask, "two", n=2, seed=4)
    samples = [empty, two]
    batch = tiny.collate(samples, seed=0)
    assert batch["sample_index"] == [1] and batch["input_ids"].shape[0] == 1
    assert batch["object_image_index"].tolist() == [0, 0] and batch["n_tiles"].tolist() == [1]
    assert batch["sam2_pixel_values"].shape[0] == 1 and batch["object_phrases"] == PHRASES[:2]
    with pytest.raises(ValueError, match="None of the 1 samples of this batch has an object"):
        tiny.collate(samples[:1], seed=0)


def test_per_object_losses_average_to_the_scalar_losses(tiny, make_image, make_mask):
    samples = [_sample(make_image, make_mask, "a", n=3), _sample(make_image, make_mask, "b", n=1, seed=7)]
    batch = tiny.collate(samples, seed=0)
    for mode in ("points", "dense"):
        with torch.no_grad():
            out = tiny.training_forward(batch, mask_loss=mode, generator=torch.Generator().manual_seed(0))
        per = out["per_object"]
        assert per["phrases"] == ["vessel", "catheter", "stenosis", "vessel"]
        assert per["mask_bce"].shape == per["mask_dice"].shape == (4,)
        assert not per["mask_bce"].requires_grad and not per["mask_dice"].requires_grad
        assert torch.allclose(per["mask_bce"].mean(), out["mask_bce"], atol=1e-6)
        assert torch.allclose(per["mask_dice"].mean(), out["mask_dice"], atol=1e-6)


def test_loss_weights_and_point_settings_are_arguments(tiny, make_image, make_mask):
    batch = tiny.collate([_sample(make_image, make_mask, n=2)], seed=0)
    with torch.no_grad():
        out = tiny.training_forward(
            batch, llm_weight=0.0, bce_weight=1.0, dice_weight=0.0, num_points=64, oversample_ratio=2.0,
            importance_sample_ratio=0.5, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert torch.allclose(out["total"], out["mask_bce"])


def test_features_of_samples_collate_left_out_are_refused(tiny, make_image, make_mask):
    empty, one = _sample(make_image, make_mask, "empty", n=0), _sample(make_image, make_mask, "one", n=1, seed=2)
    samples = [empty, one]
    batch = tiny.collate(samples, seed=0)
    with torch.no_grad():
        stale = tiny.encode_sam2(torch.zeros(2, 3, tiny.sam2_image_size, tiny.sam2_image_size))  # both images
        with pytest.raises(ValueError, match=r"SAM2 features of 2 images for 1 token rows.*sample_index"):
            tiny.training_forward(dict(batch, sam2_features=stale))
