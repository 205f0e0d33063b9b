"""Overlay colours (colour-blind-safe palette) at TP/FP/FN pixels, legends, grids without blank cells, the
per-phrase summary.json with its macro block, and the frozen-threshold record (old records included)."""

import json

import numpy as np
import pytest

from sa2va_pipeline.evaluation.frozen_threshold import MissingThresholdError, record_phrases, thresholds_by_phrase
from sa2va_pipeline.evaluation.overlays import (
    DEFAULT_COLORS,
    OKABE_ITO,
    add_legend_strip,
    beside_raw,
    error_overlay,
    grid_panels,
    grid_shape,
    legend_entries,
    overlay_grid_figure,
    phrase_colors,
    phrase_legend_entries,
    phrase_overlay,
    pick_best_median_worst,
)
from sa2va_pipeline.evaluation.report import evaluate_split, metric_key, summary_metrics
from sa2va_pipeline.evaluation.threshold_sweep import threshold_grid
from sa2va_pipeline.prediction.maps import ProbabilityMaps, quantise


def _case():
    frame = np.full((6, 6, 3), 50, np.uint8)
    truth = np.zeros((6, 6), np.uint8)
    pred = np.zeros((6, 6), np.uint8)
    truth[1, 1] = pred[1, 1] = 1  # TP
    pred[2, 2] = 1  # FP
    truth[3, 3] = 1  # FN
    return frame, pred, truth


def test_overlay_colours_at_tp_fp_fn_pixels_are_okabe_ito():
    frame, pred, truth = _case()
    out = error_overlay(frame, pred, truth, alpha=1.0)
    assert tuple(out[1, 1]) == DEFAULT_COLORS["true_positive"] == OKABE_ITO["bluish green"]
    assert tuple(out[2, 2]) == DEFAULT_COLORS["false_positive"] == OKABE_ITO["vermillion"]
    assert tuple(out[3, 3]) == DEFAULT_COLORS["false_negative"] == OKABE_ITO["sky blue"]
    assert tuple(out[0, 0]) == (50, 50, 50)  # true negative: the frame
    blended = error_overlay(frame[..., 0], pred, truth, alpha=0.5)  # a gray frame works too
    assert tuple(blended[1, 1]) == (25, 104, 82)
    custom = error_overlay(frame, pred, truth, colors={"false_positive": (255, 0, 255)}, alpha=1.0)
    assert tuple(custom[2, 2]) == (255, 0, 255)


def test_phrase_overlay_gives_each_phrase_its_colour_and_raw_frame_beside():
    frame = np.full((4, 4, 3), 10, np.uint8)
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[0, 0], b[1, 1] = True, True
    colors = phrase_colors(["blood vessel", "catheter"])
    out = phrase_overlay(frame, {"blood vessel": a, "catheter": b}, colors, alpha=1.0)
    assert tuple(out[0, 0]) == OKABE_ITO["bluish green"] and tuple(out[1, 1]) == OKABE_ITO["orange"]
    assert [label for label, _ in phrase_legend_entries(colors)] == ["bluish green: blood vessel", "orange: catheter"]
    side = beside_raw(frame, out)
    assert side.shape == (4, 12, 3) and (side[:, :4] == frame).all() and (side[:, 8:] == out).all()


def test_legend_names_the_colours():
    labels = [label for label, _ in legend_entries()]
    assert labels == ["bluish green: true positive", "vermillion: false positive",
                      "sky blue: false negative (missed)"]
    frame, pred, truth = _case()
    overlay = error_overlay(frame, pred, truth, alpha=1.0)
    with_legend = add_legend_strip(overlay)
    assert with_legend.shape[1:] == overlay.shape[1:] and with_legend.shape[0] > overlay.shape[0]
    np.testing.assert_array_equal(with_legend[:6], overlay)
    fig = overlay_grid_figure([{"overlay": overlay, "title": "a\nb"}] * 3, title="t")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == labels


def test_grids_have_no_blank_cell_and_titles_do_not_overlap_images():
    assert grid_shape(6, 3) == (2, 3) and grid_shape(4, 3) == (2, 2) and grid_shape(2, 3) == (1, 2)
    assert grid_panels(5, 6, 3) == 3 and grid_panels(7, 9, 3) == 6 and grid_panels(2, 6, 3) == 2
    frame, pred, truth = _case()
    overlay = error_overlay(frame, pred, truth)
    fig = overlay_grid_figure([{"overlay": overlay, "title": f"panel {i}\nDice 0.5"} for i in range(6)], title="grid")
    assert len(fig.axes) == 6 and all(ax.images for ax in fig.axes)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [(ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in fig.axes]
    for title_box, _ in boxes:  # no title overlaps any image (its own or the one above)
        assert not any(title_box.overlaps(ax_box) for _, ax_box in boxes)


def test_pick_best_median_worst():
    picks = pick_best_median_worst({"a": 0.9, "b": 0.1, "c": 0.5, "d": float("nan"), "e": 0.7})
    assert picks == {"best": "a", "median": "c", "worst": "d"}


def _two_phrase_case():
    vessel_a = np.zeros((8, 8), np.uint8)
    vessel_a[2:6, 2:6] = 1
    empty = np.zeros((8, 8), np.uint8)  # image b has no vessel; neither image has a catheter
    prob_a = np.where(vessel_a > 0, 0.8, 0.1)
    prob_b = np.full((8, 8), 0.1)
    prob_b[0, 0] = 0.6  # a false positive at 0.5 but not at 0.7
    cath_a = np.full((8, 8), 0.2)
    cath_a[7, 7] = 0.9  # a false catheter on image a
    maps = ProbabilityMaps(maps={("a", "blood vessel"): quantise(prob_a), ("b", "blood vessel"): quantise(prob_b),
                                 ("a", "catheter"): quantise(cath_a), ("b", "catheter"): quantise(np.zeros((8, 8)))})
    truths = {"blood vessel": {"a": vessel_a, "b": empty}, "catheter": {"a": empty, "b": empty}}
    return maps, truths


def test_summary_reports_per_phrase_frozen_reference_pooled_oracle_and_macro():
    maps, truths = _two_phrase_case()
    table, summary = evaluate_split(maps, truths, {"blood vessel": 0.7, "catheter": 0.5},
                                    oracle_grid=threshold_grid(), split="test")
    assert list(table.columns[:3]) == ["id", "phrase", "threshold"]
    assert table[["id", "phrase"]].values.tolist() == [["a", "blood vessel"], ["b", "blood vessel"],
                                                       ["a", "catheter"], ["b", "catheter"]]
    vessel, catheter = summary["phrases"]["blood vessel"], summary["phrases"]["catheter"]
    at, ref = vessel["at_threshold"], vessel["at_0.5"]
    assert vessel["threshold"] == 0.7 and at["mean"]["dice"]["mean"] == 1.0 and at["pooled"]["dice"] == 1.0
    assert ref["mean"]["dice"]["mean"] == 0.5  # image b: one false positive on an empty frame
    assert ref["pooled"]["dice"] == pytest.approx(32 / 33)
    assert ref["mean"]["hd95"]["n_undefined"] == 1 and ref["mean"]["hd95"]["n"] == 1
    assert vessel["n_images_with_phrase"] == 1 and catheter["n_images_with_phrase"] == 0
    # catheter absent everywhere: empty ground truth; image a's false catheter gives Dice 0, image b's 1
    assert catheter["at_threshold"]["mean"]["dice"]["mean"] == 0.5 and catheter["at_threshold"]["pooled"]["dice"] == 0
    assert "UPPER BOUND" in vessel["oracle_upper_bound"]["note"] and vessel["oracle_upper_bound"]["dice"]["mean"] == 1.0
    macro = summary["macro"]
    assert macro["n_phrases"] == 2 and macro["at_threshold"]["mean"]["dice"] == 0.75
    assert macro["at_threshold"]["pooled"]["dice"] == 0.5
    assert summary["threshold"] == 0.7 and summary["n_images"] == 2 and len(summary["metric_per_case"]) == 4
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became null
    metrics = summary_metrics(summary)
    assert metrics["blood vessel.dice_mean"] == {"value": 1.0, "step": 0}
    assert metrics["blood vessel.at_0.5.dice_mean"]["value"] == 0.5
    assert metrics["blood vessel.hd95_n_undefined"]["value"] == 0 and metrics["catheter.threshold"]["value"] == 0.5
    assert metrics["macro.dice_mean"]["value"] == 0.75 and metrics["macro.dice_pooled"]["value"] == 0.5
    assert "blood vessel.oracle_dice_mean_upper_bound" in metrics
    assert metric_key("vessel (left)") == "vessel _left_" and metric_key("blood vessel") == "blood vessel"


def test_frozen_threshold_records_new_and_old():
    new = {"thresholds": {"blood vessel": {"threshold": 0.4}, "catheter": {"threshold": 0.6}}, "threshold": 0.4,
           "phrases": ["blood vessel", "catheter"]}
    assert record_phrases(new) == ["blood vessel", "catheter"]
    assert thresholds_by_phrase(new, ["catheter"]) == {"catheter": 0.6}
    old = {"threshold": 0.45, "phrase": "blood vessel", "chosen_on": "val"}  # the single-phrase version's record
    assert record_phrases(old) == ["blood vessel"]
    assert thresholds_by_phrase(old, ["blood vessel"]) == {"blood vessel": 0.45}
    assert thresholds_by_phrase({"threshold": 0.3}, ["blood vessel"]) == {"blood vessel": 0.3}
    with pytest.raises(MissingThresholdError, match="catheter"):
        thresholds_by_phrase(old, ["catheter"])
