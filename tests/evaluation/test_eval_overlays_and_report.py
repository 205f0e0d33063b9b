"""Overlay colours at TP/FP/FN pixels, the legend, the grid figure, and the summary.json contents."""

import json

import numpy as np
import pytest

from sa2va_pipeline.evaluation.overlays import (
    DEFAULT_COLORS,
    add_legend_strip,
    error_overlay,
    legend_entries,
    overlay_grid_figure,
    pick_best_median_worst,
)
from sa2va_pipeline.evaluation.probabilities import ProbabilityMaps, quantise
from sa2va_pipeline.evaluation.report import evaluate_split, summary_metrics
from sa2va_pipeline.evaluation.threshold_sweep import threshold_grid


def _case():
    frame = np.full((6, 6, 3), 50, np.uint8)
    truth = np.zeros((6, 6), np.uint8)
    pred = np.zeros((6, 6), np.uint8)
    truth[1, 1] = pred[1, 1] = 1  # TP
    pred[2, 2] = 1  # FP
    truth[3, 3] = 1  # FN
    return frame, pred, truth


def test_overlay_colours_at_tp_fp_fn_pixels():
    frame, pred, truth = _case()
    out = error_overlay(frame, pred, truth, alpha=1.0)
    assert tuple(out[1, 1]) == DEFAULT_COLORS["true_positive"]
    assert tuple(out[2, 2]) == DEFAULT_COLORS["false_positive"]
    assert tuple(out[3, 3]) == DEFAULT_COLORS["false_negative"]
    assert tuple(out[0, 0]) == (50, 50, 50)  # true negative: the frame
    blended = error_overlay(frame[..., 0], pred, truth, alpha=0.5)  # a gray frame works too
    assert tuple(blended[1, 1]) == (25, 125, 25) and tuple(blended[2, 2]) == (140, 25, 25)
    custom = error_overlay(frame, pred, truth, colors={"false_positive": (255, 0, 255)}, alpha=1.0)
    assert tuple(custom[2, 2]) == (255, 0, 255)


def test_legend_names_the_colours():
    labels = [label for label, _ in legend_entries()]
    assert labels == ["green: true positive", "red: false positive", "blue: false negative (missed)"]
    frame, pred, truth = _case()
    overlay = error_overlay(frame, pred, truth, alpha=1.0)
    with_legend = add_legend_strip(overlay)
    assert with_legend.shape[1:] == overlay.shape[1:] and with_legend.shape[0] > overlay.shape[0]
    np.testing.assert_array_equal(with_legend[:6], overlay)
    fig = overlay_grid_figure([{"overlay": overlay, "title": "a"}] * 3, title="t")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == labels


def test_pick_best_median_worst():
    picks = pick_best_median_worst({"a": 0.9, "b": 0.1, "c": 0.5, "d": float("nan"), "e": 0.7})
    assert picks == {"best": "a", "median": "c", "worst": "d"}


def test_summary_reports_frozen_reference_pooled_and_oracle():
    truth_a = np.zeros((8, 8), np.uint8)
    truth_a[2:6, 2:6] = 1
    truth_b = np.zeros((8, 8), np.uint8)  # no vessel
    prob_a = np.where(truth_a > 0, 0.8, 0.1)
    prob_b = np.full((8, 8), 0.1)
    prob_b[0, 0] = 0.6  # a false positive at 0.5 but not at 0.7
    maps = ProbabilityMaps(maps={"a": quantise(prob_a), "b": quantise(prob_b)})
    table, summary = evaluate_split(
        maps, {"a": truth_a, "b": truth_b}, threshold=0.7, oracle_grid=threshold_grid(), split="test"
    )
    assert list(table["id"]) == ["a", "b"] and table["dice"].tolist() == [1.0, 1.0]
    at, ref = summary["at_threshold"], summary["at_0.5"]
    assert at["threshold"] == 0.7 and at["mean"]["dice"]["mean"] == 1.0 and at["pooled"]["dice"] == 1.0
    assert ref["mean"]["dice"]["mean"] == 0.5  # image b: one false positive on an empty frame
    assert ref["pooled"]["dice"] == pytest.approx(32 / 33)
    assert ref["mean"]["hd95"]["n_undefined"] == 1 and ref["mean"]["hd95"]["n"] == 1
    assert "UPPER BOUND" in summary["oracle_upper_bound"]["note"]
    assert summary["oracle_upper_bound"]["dice"]["mean"] == 1.0
    assert len(summary["metric_per_case"]) == 2
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became null
    metrics = summary_metrics(summary)
    assert metrics["dice_mean"] == {"value": 1.0, "step": 0}
    assert metrics["at_0.5.dice_mean"]["value"] == 0.5 and metrics["at_0.5.hd95_n_undefined"]["value"] == 1
    assert "oracle_dice_mean_upper_bound" in metrics and metrics["threshold"]["value"] == 0.7
