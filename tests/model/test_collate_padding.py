"""Bucketed prompt lengths (``collate(pad_to_multiple=...)``, ``training.pad_to_multiple``): the padded length is
a multiple, the extra positions are masked padding with no label, and the losses do not change, for the
InternVL family and both Qwen-VL families (whose M-RoPE positions come from the attention mask)."""

from __future__ import annotations

import random

import pytest
import torch

from sa2va_pipeline.model.losses import IGNORE_INDEX

PRESETS = ["tiny", "tiny-qwen2_5-vl", "tiny-qwen3-vl"]


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    from sa2va_pipeline.model import Sa2VA

    torch.set_num_threads(2)
    return Sa2VA.from_preset(request.param, sam2_image_size=256).eval()


def _samples(make_image, make_mask):
    # two prompts of different lengths (one object vs two), so the rows are padded by different amounts; with
    # the prompts drawn from Random(1) no family's longest row is a multiple of 64
    return [(make_image(0, 96, 128), make_mask(0, 96, 128), "vessel"),
            (make_image(1, 64, 64), [make_mask(1, 64, 64), make_mask(2, 64, 64)], ["vessel", "artery"])]  # fmt: skip


def test_padding_to_a_multiple_changes_the_length_but_not_the_losses(model, make_image, make_mask):
    samples = _samples(make_image, make_mask)
    plain = model.collate(samples, rng=random.Random(1))
    padded = model.collate(samples, rng=random.Random(1), pad_to_multiple=64)
    length, width = plain["input_ids"].shape[1], padded["input_ids"].shape[1]
    assert width % 64 == 0 and length < width < length + 64
    assert torch.equal(padded["input_ids"][:, :length], plain["input_ids"])
    assert torch.equal(padded["labels"][:, :length], plain["labels"])
    assert torch.equal(padded["attention_mask"][:, :length], plain["attention_mask"])
    assert (padded["input_ids"][:, length:] == model.pad_id).all()
    assert (padded["labels"][:, length:] == IGNORE_INDEX).all()
    assert (padded["attention_mask"][:, length:] == 0).all()
    with torch.no_grad():
        want = model.training_forward(plain, generator=torch.Generator().manual_seed(0))
        got = model.training_forward(padded, generator=torch.Generator().manual_seed(0))
    for key in ("llm", "mask_bce", "mask_dice", "total"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    # per object, 1e-4: the mask losses are taken at the most uncertain sampled points (top-k of the
    # logits), and a [SEG] state that differs by float noise (1.5e-8 for Qwen3-VL with transformers 5.24 on
    # the CPU) can swap one chosen point: one object's Dice loss moved by 3.7e-5. A padding bug moves more.
    for key in ("mask_bce", "mask_dice"):
        torch.testing.assert_close(got["per_object"][key], want["per_object"][key], rtol=1e-4, atol=1e-4)


def test_a_length_already_on_the_multiple_is_kept_and_bad_multiples_are_refused(model, make_image, make_mask):
    samples = _samples(make_image, make_mask)
    length = model.collate(samples, rng=random.Random(1))["input_ids"].shape[1]
    assert model.collate(samples, rng=random.Random(1), pad_to_multiple=length)["input_ids"].shape[1] == length
    assert model.collate(samples, rng=random.Random(1), pad_to_multiple=1)["input_ids"].shape[1] == length
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="pad_to_multiple"):
            model.collate(samples, rng=random.Random(1), pad_to_multiple=bad)


HOST_POSITIONS = ("image_positions", "seg_positions", "label_positions", "label_targets")


def test_positions_found_on_the_host_give_the_losses_and_gradients_of_the_masks(model, make_image, make_mask):
    """collate's host positions (read by training_forward instead of boolean masks, which sync the GPU) pick
    the same rows: losses and every gradient are equal bit for bit, with padding in the batch."""
    batch = model.collate(_samples(make_image, make_mask), rng=random.Random(1), pad_to_multiple=64)
    assert set(HOST_POSITIONS) <= batch.keys()
    assert len(batch["seg_positions"]) == len(batch["object_phrases"])
    masks_only = {k: v for k, v in batch.items() if k not in HOST_POSITIONS}
    results = []
    for b in (batch, masks_only):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = model.training_forward(b, generator=torch.Generator().manual_seed(0))
            out["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: out[k].detach() for k in ("llm", "mask_bce", "mask_dice", "total")}, grads))
    model.zero_grad(set_to_none=True)
    (losses, grads), (want_losses, want_grads) = results
    assert grads and grads.keys() == want_grads.keys()
    for key, value in want_losses.items():
        assert torch.equal(losses[key], value), key
    for name, value in want_grads.items():
        assert torch.equal(grads[name], value), name
