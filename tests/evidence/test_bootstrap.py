"""Group bootstrap: whole groups are resampled (never frames), deterministic, and placed beside the means."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sa2va_pipeline.evaluation.bootstrap import (
    add_ci95,
    group_bootstrap_mean,
    group_bootstrap_pooled,
    group_multiplicities,
    paired_difference,
)
from sa2va_pipeline.evaluation.metrics import image_metrics


def test_multiplicities_draw_whole_groups():
    weights = group_multiplicities(5, 300, seed=1)
    assert weights.shape == (300, 5) and (weights.sum(axis=1) == 5).all()
    assert np.array_equal(weights, group_multiplicities(5, 300, seed=1))


def test_constant_within_groups_ci_is_that_of_the_groups_not_of_the_frames():
    # 4 videos of 50 identical frames each: a frame bootstrap sees 200 "independent" cases and a tiny interval;
    # the group bootstrap sees 4 cases, and its interval equals that of the 4 group values alone.
    group_values = [0.2, 0.5, 0.6, 0.9]
    values = np.repeat(group_values, 50)
    groups = np.repeat(["a", "b", "c", "d"], 50)
    by_group = group_bootstrap_mean(values, groups, n_resamples=4000, seed=3)
    alone = group_bootstrap_mean(group_values, ["a", "b", "c", "d"], n_resamples=4000, seed=3)
    assert by_group["n_groups"] == 4
    assert by_group["low"] == pytest.approx(alone["low"]) and by_group["high"] == pytest.approx(alone["high"])
    frames = group_bootstrap_mean(
        values, np.arange(200), n_resamples=4000, seed=3
    )  # every frame its own group
    assert (by_group["high"] - by_group["low"]) > 4 * (frames["high"] - frames["low"])
    assert by_group["low"] <= values.mean() <= by_group["high"]


def test_nan_values_are_skipped_like_the_summary_mean():
    out = group_bootstrap_mean([0.5, np.nan, 0.5, 0.5], ["a", "a", "b", "b"], n_resamples=50, seed=0)
    assert out["low"] == pytest.approx(0.5) and out["high"] == pytest.approx(0.5)
    empty = group_bootstrap_mean([np.nan, np.nan], ["a", "b"], n_resamples=10, seed=0)
    assert empty["low"] is None and empty["high"] is None
    one_video = group_bootstrap_mean([0.2, 0.9, 0.5], ["a", "a", "a"], n_resamples=10, seed=0)
    assert one_video["low"] is None and "needs >= 2 groups" in one_video["note"]


def _table(rng, n_groups=5, frames=4):
    rows, groups = [], []
    for g in range(n_groups):
        for f in range(frames):
            truth = np.zeros((24, 24), np.uint8)
            truth[4:20, 8 + g : 11 + g] = 1
            pred = truth.copy()
            pred[rng.integers(0, 24, 12 * (g + 1)), rng.integers(0, 24, 12 * (g + 1))] ^= 1
            rows.append({"id": f"v{g}_frame_{f}", **image_metrics(pred, truth)})
            groups.append(f"v{g}")
    return pd.DataFrame(rows), groups


def test_pooled_interval_brackets_the_pooled_value():
    from sa2va_pipeline.evaluation.metrics import pooled_metrics

    table, groups = _table(np.random.default_rng(0))
    pooled = pooled_metrics(table.to_dict("records"))
    intervals = group_bootstrap_pooled(table, groups, n_resamples=500, seed=0)
    for metric in ("dice", "iou", "precision", "recall", "cldice"):
        assert intervals[metric]["low"] <= pooled[metric] + 1e-9 <= intervals[metric]["high"] + 2e-9
    with pytest.raises(ValueError, match="count column"):
        group_bootstrap_pooled(table.drop(columns=["tp"]), groups)


def test_paired_difference_and_add_ci95():
    table, groups = _table(np.random.default_rng(1))
    ids = table["id"].tolist()
    group_of = dict(zip(ids, groups))
    a = dict(zip(ids, table["dice"]))
    b = {i: v - 0.1 for i, v in a.items()}
    diff = paired_difference(a, b, group_of, n_resamples=200, seed=0)
    assert diff["mean"] == pytest.approx(0.1) and diff["low"] == pytest.approx(0.1) and diff["n_groups"] == 5
    with pytest.raises(ValueError, match="share no image"):
        paired_difference(a, {"x": 1.0}, group_of)

    summary = {
        "at_threshold": {
            "mean": {
                "dice": {"mean": float(table["dice"].mean())},
                "hd95": {"mean": float(table["hd95"].mean())},
            },
            "pooled": {"dice": 0.5, "cldice": 0.5},
        }
    }
    add_ci95(summary, table, group_of, n_resamples=200, seed=0)
    block = summary["at_threshold"]
    low, high = block["mean"]["dice"]["ci95"]
    assert low <= block["mean"]["dice"]["mean"] <= high
    assert set(block["pooled_ci95"]) == {"dice", "cldice"} and block["ci95_method"]["n_groups"] == 5
    with pytest.raises(ValueError, match="no group"):
        add_ci95(summary, table, {}, n_resamples=10)


def test_macro_interval_draws_groups_once_for_every_phrase():
    from sa2va_pipeline.evaluation.bootstrap import add_macro_ci95, group_bootstrap_macro
    from sa2va_pipeline.evaluation.metrics import pooled_metrics

    # two phrases on the same 5 videos x 4 frames; the second phrase's Dice is the first's minus 0.2
    vessel, groups = _table(np.random.default_rng(2))
    catheter = vessel.assign(dice=vessel["dice"] - 0.2)
    table = pd.concat([vessel.assign(phrase="vessel"), catheter.assign(phrase="catheter")], ignore_index=True)
    rows_groups = groups + groups
    out = group_bootstrap_macro(table, rows_groups, ["dice", "hd95"], n_resamples=300, seed=4)

    # by hand: the same multiplicities for both phrases, macro = mean of the two replicate means
    weights = group_multiplicities(5, 300, seed=4)
    per_group = vessel.assign(group=groups).groupby("group")["dice"].agg(["sum", "count"])
    first = (weights @ per_group["sum"].to_numpy()) / (weights @ per_group["count"].to_numpy())
    expected = np.percentile((first + (first - 0.2)) / 2, [2.5, 97.5])
    assert [out["mean"]["dice"]["low"], out["mean"]["dice"]["high"]] == pytest.approx(list(expected))
    # phrases drawn independently would give a narrower interval; one draw keeps their correlation
    single = group_bootstrap_mean(vessel["dice"], groups, n_resamples=300, seed=4)
    assert out["mean"]["dice"]["high"] - out["mean"]["dice"]["low"] == pytest.approx(single["high"] - single["low"])
    # one phrase: the macro interval is that phrase's own interval
    alone = group_bootstrap_macro(vessel.assign(phrase="vessel"), groups, ["dice"], n_resamples=300, seed=4)
    assert alone["mean"]["dice"]["low"] == pytest.approx(single["low"])
    pooled = pooled_metrics(vessel.to_dict("records"))["dice"]
    assert out["pooled"]["dice"]["low"] <= pooled <= out["pooled"]["dice"]["high"] + 1e-9

    macro = {"mean": {"dice": float(table["dice"].mean()), "hd95": 1.0}, "pooled": {"dice": pooled, "iou": 0.4}}
    add_macro_ci95(macro, table, rows_groups, n_resamples=300, seed=4)
    assert macro["mean_ci95"]["dice"] == [out["mean"]["dice"]["low"], out["mean"]["dice"]["high"]]
    assert set(macro["pooled_ci95"]) == {"dice", "iou"} and macro["ci95_method"]["n_groups"] == 5
    lone = {"mean": {"dice": 0.5}, "pooled": {}}
    add_macro_ci95(lone, table.iloc[:4], ["v0"] * 4, n_resamples=10)
    assert lone["mean_ci95"]["dice"] == [None, None] and "needs >= 2 groups" in lone["ci95_method"]["note"]
