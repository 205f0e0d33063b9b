"""Per-image metrics against hand-computed values and a brute-force HD95."""

import math

import numpy as np
import pytest

from sa2va_pipeline.evaluation.metrics import (
    cldice,
    confusion_counts,
    hd95,
    image_metrics,
    overlap_metrics,
    pooled_metrics,
)


def _masks():
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :] = 1  # 4 px
    truth[1, 0] = 1  # 5 px in all
    pred = np.zeros((4, 4), np.uint8)
    pred[0, :3] = 1  # 3 TP
    pred[2, 2] = 1  # 1 FP
    return pred, truth


def test_overlap_metrics_hand_computed():
    pred, truth = _masks()
    counts = confusion_counts(pred, truth)
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (3, 1, 2, 10)
    m = overlap_metrics(counts)
    assert m["dice"] == pytest.approx(6 / 9)
    assert m["iou"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(10 / 11)


def test_both_empty_is_perfect():
    empty = np.zeros((5, 5), np.uint8)
    m = image_metrics(empty, empty)
    for name in ("dice", "iou", "precision", "recall", "specificity", "cldice"):
        assert m[name] == 1.0, name
    assert m["hd95"] == 0.0


def test_one_side_empty():
    empty = np.zeros((5, 5), np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3] = 1
    missed = image_metrics(empty, blob)  # nothing predicted on a frame with vessels
    assert (missed["dice"], missed["iou"], missed["precision"], missed["recall"], missed["cldice"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert missed["specificity"] == 1.0
    assert math.isnan(missed["hd95"])
    hallucinated = image_metrics(blob, empty)  # vessels predicted on a frame without any
    assert (hallucinated["dice"], hallucinated["precision"], hallucinated["recall"]) == (0, 0, 0)
    assert hallucinated["specificity"] == pytest.approx(21 / 25)
    assert math.isnan(hallucinated["hd95"])


def test_one_pixel_lines():
    truth = np.zeros((7, 9), np.uint8)
    truth[3, 2:5] = 1  # 3-px line
    pred = np.zeros_like(truth)
    pred[3, 1:6] = 1  # 5-px line covering it
    # Tprec = 3/5 (pred skeleton = the whole line), Tsens = 3/3 -> clDice = 2*0.6/(1.6) = 0.75
    assert cldice(pred, truth) == pytest.approx(0.75)
    assert image_metrics(pred, truth)["dice"] == pytest.approx(2 * 3 / 8)
    shifted = np.zeros_like(truth)
    shifted[4, 2:5] = 1  # parallel line one row below: no overlap at all
    m = image_metrics(shifted, truth)
    assert m["dice"] == 0.0 and m["cldice"] == 0.0
    assert m["hd95"] == pytest.approx(1.0)
    assert cldice(truth, truth) == 1.0


def test_hd95_known_distances():
    truth = np.zeros((10, 10), np.uint8)
    truth[:, 2] = 1
    pred = np.zeros_like(truth)
    pred[:, 5] = 1
    assert hd95(pred, truth) == pytest.approx(3.0)  # every boundary pixel is 3 px from the other line
    single_a = np.zeros((9, 9), np.uint8)
    single_a[2, 2] = 1
    single_b = np.zeros_like(single_a)
    single_b[6, 5] = 1
    assert hd95(single_a, single_b) == pytest.approx(5.0)  # 3-4-5 triangle
    # One far outlier among 21 pooled distances does not move the 95th percentile (linear: index 19 of 0..20).
    with_outlier = truth.copy()
    with_outlier[0, 9] = 1
    assert hd95(with_outlier, truth) == pytest.approx(0.0)


def _brute_force_hd95(a, b):
    from scipy.ndimage import binary_erosion, generate_binary_structure

    cross = generate_binary_structure(2, 1)
    sa = np.argwhere(a & ~binary_erosion(a, cross, border_value=0))
    sb = np.argwhere(b & ~binary_erosion(b, cross, border_value=0))
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = rng.random((20, 24)) > 0.8
        b = rng.random((20, 24)) > 0.7
        assert hd95(a, b) == pytest.approx(_brute_force_hd95(a, b))


def test_pooled_metrics_sum_counts():
    pred, truth = _masks()
    rows = [image_metrics(pred, truth), image_metrics(np.zeros_like(truth), truth)]
    pooled = pooled_metrics(rows)
    # TP 3, FP 1, FN 2 + 5, TN 10 + 11
    assert pooled["dice"] == pytest.approx(6 / (6 + 1 + 7))
    assert pooled["recall"] == pytest.approx(3 / 10)
    assert pooled["specificity"] == pytest.approx(21 / 22)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        image_metrics(np.zeros((3, 3)), np.zeros((3, 4)))
