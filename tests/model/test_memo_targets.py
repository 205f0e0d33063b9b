"""Training targets and feature-cache digests are computed once per sample array, never for a new one."""

from __future__ import annotations

import gc

import numpy as np
import torch

from sa2va_pipeline.memo import ObjectMemo
from sa2va_pipeline.model.preprocessing import mask_to_tensor, resize_masks_area
from sa2va_pipeline.model.processing import _target_mask


def test_memo_computes_once_per_live_object_and_never_confuses_a_new_one():
    memo, calls = ObjectMemo(), []
    a = np.zeros(4)
    assert memo.get(a, "k", lambda: calls.append(1) or 1) == 1
    assert memo.get(a, "k", lambda: calls.append(1) or 2) == 1 and len(calls) == 1
    assert memo.get(a, "other", lambda: 3) == 3
    del a
    gc.collect()
    b = np.zeros(4)  # may live at the old address: must not get the old value
    assert memo.get(b, "k", lambda: 4) == 4
    assert memo.get([1], "k", lambda: 5) == 5  # no weak reference: computed every time


def test_target_mask_equals_the_direct_computation_and_checks_shape():
    rng = np.random.default_rng(0)
    masks = (rng.random((2, 64, 48)) > 0.7).astype(np.uint8)
    for k in range(2):
        got = _target_mask(masks, k, masks[k], 16, (64, 48), 0)
        want = resize_masks_area(mask_to_tensor(masks[k])[None], 16)[0]
        assert torch.equal(got.float(), want)
        assert _target_mask(masks, k, masks[k], 16, (64, 48), 0) is got  # memoised
    try:
        _target_mask(masks[:1].copy(), 0, masks[0], 16, (60, 48), 3)
    except ValueError as error:
        assert "Sample 3" in str(error)
    else:
        raise AssertionError("a mask of the wrong size must be refused")
