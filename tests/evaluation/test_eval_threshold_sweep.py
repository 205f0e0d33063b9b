"""The vectorised sweep: exact counts, the known optimum, pooled vs mean-per-image objectives, oracle."""

import numpy as np
import pytest

from sa2va_pipeline.evaluation.metrics import dice
from sa2va_pipeline.prediction.maps import binarize, dequantise, quantise
from sa2va_pipeline.evaluation.threshold_sweep import (
    choose_threshold,
    oracle_thresholds,
    sweep_thresholds,
    threshold_counts,
    threshold_grid,
)


def test_grid_is_inclusive_and_clean():
    grid = threshold_grid(0.05, 0.95, 0.01)
    assert len(grid) == 91 and grid[0] == 0.05 and grid[-1] == 0.95 and grid[45] == 0.5
    with pytest.raises(ValueError):
        threshold_grid(0.9, 0.1, 0.01)


@pytest.mark.parametrize("quantised", [False, True])
def test_counts_equal_brute_force(quantised):
    rng = np.random.default_rng(0)
    prob = rng.random((40, 50)).astype(np.float32)
    prob[0, :10] = [0.05, 0.1, 0.5, 0.51, 0.95, 0.2, 0.3, 0.7, 0.0, 1.0]  # values exactly on the grid
    if quantised:
        prob = dequantise(quantise(prob))
    truth = rng.random((40, 50)) > 0.7
    grid = threshold_grid()
    counts = threshold_counts(prob, truth, grid)
    for j, t in enumerate(grid):
        pred = binarize(prob, t)
        assert counts["tp"][j] == np.count_nonzero(pred & truth)
        assert counts["fp"][j] == np.count_nonzero(pred & ~truth)
        assert counts["fn"][j] == np.count_nonzero(~pred & truth)
        assert counts["tn"][j] == np.count_nonzero(~pred & ~truth)


def test_sweep_picks_known_optimum_middle_of_plateau():
    truth = np.zeros((4, 5), np.uint8)
    truth[:2] = 1  # 10 foreground px at 0.55, 10 background px at 0.45
    prob = np.where(truth > 0, 0.55, 0.45).astype(np.float32)
    sweep, _ = sweep_thresholds({"a": prob}, {"a": truth}, threshold_grid())
    chosen = choose_threshold(sweep, "pooled_dice")
    # Dice is 1 for every threshold in (0.45, 0.55]: 0.46 ... 0.55, the middle one is picked.
    assert chosen["score"] == 1.0
    assert chosen["threshold"] == pytest.approx(0.51)


def test_sweep_optimum_matches_brute_force_on_noisy_maps():
    rng = np.random.default_rng(1)
    probs, truths = {}, {}
    for i in range(4):
        truth = rng.random((30, 30)) > 0.8
        probs[str(i)] = np.clip(np.where(truth, 0.6, 0.3) + rng.normal(0, 0.2, truth.shape), 0, 1).astype(
            np.float32
        )
        truths[str(i)] = truth
    grid = threshold_grid()
    sweep, per_image = sweep_thresholds(probs, truths, grid)
    pooled = []
    for t in grid:
        preds = [binarize(probs[k], t) for k in probs]
        tp = sum(np.count_nonzero(p & truths[k]) for p, k in zip(preds, probs))
        size = sum(np.count_nonzero(p) + np.count_nonzero(truths[k]) for p, k in zip(preds, probs))
        pooled.append(2 * tp / size)
    np.testing.assert_allclose(sweep["dice_pooled"], pooled)
    np.testing.assert_allclose(
        per_image.loc["2"].to_numpy(), [dice(binarize(probs["2"], t), truths["2"]) for t in grid]
    )
    assert choose_threshold(sweep)["threshold"] == pytest.approx(grid[int(np.argmax(pooled))])


def test_pooled_and_mean_objectives_differ_where_they_should():
    # Frame A: many vessel px (p 0.5) and as many background px (p 0.3).
    # Frame B: a few vessel px at p 0.25, background at 0.05.
    truth_a = np.zeros((40, 50), np.uint8)
    truth_a[:20] = 1
    prob_a = np.where(truth_a > 0, 0.5, 0.3).astype(np.float32)
    truth_b = np.zeros((40, 50), np.uint8)
    truth_b[0, :10] = 1
    prob_b = np.where(truth_b > 0, 0.25, 0.05).astype(np.float32)
    sweep, per_image = sweep_thresholds(
        {"a": prob_a, "b": prob_b}, {"a": truth_a, "b": truth_b}, threshold_grid()
    )
    pooled = choose_threshold(sweep, "pooled_dice")
    mean = choose_threshold(sweep, "mean_dice")
    # Pooled Dice follows the big frame: thresholds in (0.3, 0.5] (B is missed entirely).
    assert 0.3 < pooled["threshold"] <= 0.5 and pooled["dice_mean"] == pytest.approx(0.5)
    # Mean Dice rescues the small frame: thresholds in (0.05, 0.25] (A gets 1000 false positives).
    assert 0.05 < mean["threshold"] <= 0.25 and mean["score"] == pytest.approx((2 / 3 + 1) / 2)
    oracle = oracle_thresholds(per_image)
    assert oracle.loc["a", "oracle_dice"] == 1.0 and oracle.loc["b", "oracle_dice"] == 1.0
    assert (
        0.3 < oracle.loc["a", "oracle_threshold"] <= 0.5
        and 0.05 < oracle.loc["b", "oracle_threshold"] <= 0.25
    )


def test_unknown_objective_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="objective"):
        choose_threshold(sweep_thresholds([np.zeros((2, 2))], [np.zeros((2, 2))], threshold_grid())[0], "f1")
    with pytest.raises(ValueError, match="zero images"):
        sweep_thresholds([], [], threshold_grid())
