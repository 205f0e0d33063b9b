"""The threshold, evaluation and inference pipelines end to end on the fake model (SequentialRunner), with
two phrases (``blood vessel`` everywhere but one frame, ``catheter`` in half the frames)."""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_fakes import CATHETER, EVALUATION, OVERLAY, PHRASE, PHRASES, PREDICTION, THRESHOLD, fake_project  # noqa: F401
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from sa2va_pipeline.errors import UserError
from sa2va_pipeline.inference.folder import EmptyInputFolderError
from sa2va_pipeline.pipelines.evaluation import create_pipeline as evaluation_pipeline
from sa2va_pipeline.pipelines.inference import create_pipeline as inference_pipeline
from sa2va_pipeline.pipelines.threshold import create_pipeline as threshold_pipeline

INFERENCE = {
    "input_dir": None,
    "phrases": None,
    "threshold": None,
    "max_pixels": 50_000_000,
    "save_probabilities": True,
    "save_overlays": True,
    "grid_images": 6,
    "grid_columns": 3,
    "extensions": [".png", ".jpg", ".jpeg"],
}


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can read intermediate outputs afterwards."""

    def _release(self) -> None:
        pass


def _catalog(pipeline, inputs: dict) -> DataCatalog:
    catalog = DataCatalog({name: KeptMemoryDataset(copy_mode="assign") for name in pipeline.datasets()})
    for name, value in inputs.items():
        catalog[name] = KeptMemoryDataset(value, copy_mode="assign")
    return catalog


def _params(project, **extra):
    return {
        "trained_model": project.model_dir,
        "split_manifest": project.manifest,
        "annotations": project.annotations,
        "params:phrase": PHRASE,
        "params:prediction": PREDICTION,
        "params:threshold": THRESHOLD,
        "params:evaluation": EVALUATION,
        "params:overlay": OVERLAY,
        **extra,
    }


def _run_threshold(project, stored=None) -> DataCatalog:
    pipeline = threshold_pipeline()
    catalog = _catalog(pipeline, _params(project, val_probabilities_stored=stored))
    SequentialRunner().run(pipeline, catalog)
    return catalog


def test_threshold_pipeline_freezes_one_val_threshold_per_phrase_and_reuses_maps(fake_project):  # noqa: F811
    catalog = _run_threshold(fake_project)
    frozen = catalog.load("frozen_threshold")
    sweep = catalog.load("threshold_sweep")
    assert frozen["chosen_on"] == "val" and frozen["n_images"] == 5
    assert frozen["phrases"] == PHRASES and list(frozen["thresholds"]) == PHRASES  # from the train annotations
    for phrase in PHRASES:
        part = sweep[sweep["phrase"] == phrase]
        assert len(part) == 91
        chosen = frozen["thresholds"][phrase]
        assert chosen["threshold"] == pytest.approx(part.loc[part["dice_pooled"].idxmax(), "threshold"], abs=0.05)
    vessel, catheter = frozen["thresholds"][PHRASE], frozen["thresholds"][CATHETER]
    assert 0.4 <= vessel["threshold"] <= 0.6  # fake maps: vessels 0.45-0.95, background 0-0.55
    assert 0.3 <= catheter["threshold"] <= 0.45  # catheter 0.35-0.75, background 0-0.43
    assert catheter["n_images_with_phrase"] == 3 and vessel["n_images_with_phrase"] == 5
    assert frozen["threshold"] == vessel["threshold"] and frozen["phrase"] == PHRASE  # for old readers
    assert frozen["model"]["model_dir"] == str(fake_project.model_dir.resolve())
    assert catalog.load("threshold_metrics")[f"{CATHETER}.chosen"] == {"value": catheter["threshold"], "step": 0}
    curves = catalog.load("threshold_sweep_curves")
    assert [p["step"] for p in curves[f"{PHRASE}.dice_pooled"]][:2] == [50, 60] and f"{CATHETER}.dice_mean" in curves
    fig = catalog.load("threshold_sweep_plot")
    assert len(fig.axes) == 2 and CATHETER in fig.axes[1].get_title()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"Dice (pooled)", "precision (pooled)", "recall (pooled)"} <= set(labels)
    assert len(fake_project.loads) == 1 and sorted(set(fake_project.asked)) == sorted(PHRASES)
    assert len(catalog.load("val_probabilities")) == 10  # 5 images x 2 phrases
    # A second run with the stored maps of the same model predicts nothing.
    again = _run_threshold(fake_project, stored=catalog.load("val_probabilities"))
    assert len(fake_project.loads) == 1 and again.load("frozen_threshold")["thresholds"] == frozen["thresholds"]


def test_threshold_is_chosen_on_val_only_structurally():
    threshold, evaluation = threshold_pipeline(), evaluation_pipeline()
    assert not [name for name in threshold.datasets() if "test" in name]
    score_test = next(n for n in evaluation.nodes if n.name == "score_test")
    assert "frozen_threshold" in score_test.inputs and "test_probabilities" in score_test.inputs
    assert "frozen_threshold" not in evaluation.all_outputs()
    assert "frozen_threshold" in threshold.all_outputs()


def _run_evaluation(project) -> tuple[DataCatalog, dict]:
    frozen_catalog = _run_threshold(project)
    frozen = frozen_catalog.load("frozen_threshold")
    pipeline = evaluation_pipeline()
    catalog = _catalog(pipeline, _params(project, frozen_threshold=frozen,
                                         val_probabilities=frozen_catalog.load("val_probabilities"),
                                         test_probabilities_stored=None))
    SequentialRunner().run(pipeline, catalog)
    return catalog, frozen


def test_evaluation_scores_every_phrase_on_every_image_at_its_frozen_threshold(fake_project):  # noqa: F811
    catalog, frozen = _run_evaluation(fake_project)
    for split, n in (("val", 5), ("test", 4)):
        table = catalog.load(f"evaluation_per_image_{split}")
        summary = catalog.load(f"evaluation_summary_{split}")
        assert len(table) == 2 * n and list(table.columns[:2]) == ["id", "phrase"]
        assert (table.groupby("phrase").size() == n).all() and set(table["phrase"]) == set(PHRASES)
        assert summary["n_images"] == n and list(summary["phrases"]) == PHRASES
        for phrase in PHRASES:
            block = summary["phrases"][phrase]
            assert block["threshold"] == frozen["thresholds"][phrase]["threshold"]
            rows = table[table["phrase"] == phrase]
            assert (rows["threshold"] == block["threshold"]).all()
            assert block["at_threshold"]["mean"]["dice"]["mean"] == pytest.approx(rows["dice"].mean())
            assert {"at_threshold", "at_0.5", "oracle_upper_bound"} <= set(block)
        macro = summary["macro"]["at_threshold"]
        assert macro["mean"]["dice"] == pytest.approx(
            np.mean([summary["phrases"][p]["at_threshold"]["mean"]["dice"]["mean"] for p in PHRASES]))
        assert macro["pooled"]["dice"] == pytest.approx(
            np.mean([summary["phrases"][p]["at_threshold"]["pooled"]["dice"] for p in PHRASES]))
        assert summary["provenance"]["same_model"] is True
        metrics = catalog.load(f"evaluation_metrics_{split}")
        assert metrics[f"{CATHETER}.dice_mean"]["value"] == summary["phrases"][CATHETER]["at_threshold"]["mean"]["dice"]["mean"]
        assert metrics["macro.dice_mean"]["value"] == pytest.approx(macro["mean"]["dice"])
        overlays = catalog.load(f"evaluation_overlays_{split}")
        assert sorted((name.split("/")[0], name.split("/")[1].split("_")[0]) for name in overlays) == sorted(
            (folder, rank) for folder in ("blood_vessel", "catheter") for rank in ("best", "median", "worst"))
        grid = catalog.load(f"evaluation_overlay_grid_{split}")
        assert len([ax for ax in grid.axes if ax.images]) == 6  # 2 phrases x best/median/worst, no blank cell
    test = catalog.load("evaluation_per_image_test").set_index(["id", "phrase"])
    # an absent phrase is an empty ground truth: frames without a catheter score 1 only if nothing is predicted
    no_catheter = [i for i in fake_project.manifest.query("split == 'test'")["id"] if CATHETER not in fake_project.samples[i]["phrases"]]
    assert no_catheter and all(test.loc[(i, CATHETER), "tp"] == 0 for i in no_catheter)
    test_summary = catalog.load("evaluation_summary_test")
    hd = test_summary["phrases"][PHRASE]["at_threshold"]["mean"]["hd95"]
    assert hd["n"] + hd["n_undefined"] == 4  # the empty test frame: HD95 undefined unless nothing is predicted
    assert fake_project.calls and all(load[0] == str(fake_project.model_dir) for load in fake_project.loads)


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _run_inference(project, input_dir, frozen, **inference) -> DataCatalog:
    pipeline = inference_pipeline()
    catalog = _catalog(pipeline, _params(project, frozen_threshold=frozen,
                                         **{"params:inference": {**INFERENCE, "input_dir": str(input_dir), **inference}}))
    SequentialRunner().run(pipeline, catalog)
    return catalog


FROZEN = {"thresholds": {PHRASE: {"threshold": 0.5}, CATHETER: {"threshold": 0.4}}, "threshold": 0.5,
          "phrases": PHRASES}


def test_inference_writes_one_mask_per_image_and_phrase_and_reports_refusals(fake_project, tmp_path):  # noqa: F811
    inputs = tmp_path / "new images"
    inputs.mkdir()
    sample = next(iter(fake_project.samples.values()))
    Image.fromarray(sample["image"]).save(inputs / "frame one.png")
    Image.fromarray(sample["image"]).save(inputs / "frame one.jpg")  # same stem, other format
    (inputs / "broken.png").write_bytes(b"not a png at all")
    (inputs / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside.png"
    Image.fromarray(sample["image"]).save(outside)
    os.symlink(outside, inputs / "link.png")
    Image.new("L", (200, 100)).save(inputs / "huge.png")  # 20000 pixels, above the limit below
    before = _tree_digest(inputs)
    listing_before = sorted(p.name for p in inputs.iterdir())

    catalog = _run_inference(fake_project, inputs, FROZEN, max_pixels=10_000)

    assert _tree_digest(inputs) == before and sorted(p.name for p in inputs.iterdir()) == listing_before
    report = catalog.load("inference_report").set_index("file")
    assert report.loc["broken.png", "status"] == "unreadable" and report.loc["broken.png", "message"]
    assert report.loc["notes.txt", "status"] == "not_an_image"
    assert report.loc["link.png", "status"] == "refused_symlink"
    assert report.loc["huge.png", "status"] == "too_large" and "max_pixels" in report.loc["huge.png", "message"]
    assert report.loc["huge.png", "width"] == 200
    assert report.loc["frame one.png", "status"] == "ok" and report.loc["frame one.png", "output_name"] == "frame one_png.png"
    assert 0 < report.loc["frame one.png", f"foreground_fraction.{CATHETER}"] < 1
    outputs = catalog.load("inference_outputs")
    expected = {f"{kind}/{folder}/frame one_{ext}.png" for kind in ("masks", "probabilities")
                for folder in ("blood_vessel", "catheter") for ext in ("png", "jpg")}
    assert set(outputs) == expected | {f"overlays/frame one_{ext}.png" for ext in ("png", "jpg")}
    for phrase, folder, channel, threshold in ((PHRASE, "blood_vessel", 0, 0.5), (CATHETER, "catheter", 1, 0.4)):
        mask = np.asarray(Image.open(io.BytesIO(outputs[f"masks/{folder}/frame one_png.png"])))
        prob = (sample["image"][..., channel].astype(np.float32) / 255).astype(np.float16)  # inference keeps float16
        truth = prob.astype(np.float32) >= np.float32(threshold)
        np.testing.assert_array_equal(mask, truth.astype(np.uint8) * 255)
    overlay = np.asarray(Image.open(io.BytesIO(outputs["overlays/frame one_png.png"])).convert("RGB"))
    assert overlay.shape[0] > 32 and overlay.shape[1] > 2 * 32  # legend strip below, raw frame beside
    np.testing.assert_array_equal(overlay[:32, :32], sample["image"])  # the raw frame, untouched
    metrics = catalog.load("inference_metrics")
    assert metrics["n_images"]["value"] == 2 and metrics["n_skipped"]["value"] == 4
    assert metrics[f"{CATHETER}.threshold"]["value"] == 0.4
    grid = catalog.load("inference_overlay_grid")
    assert len([ax for ax in grid.axes if ax.images]) == 2 and len(grid.axes) == 2  # no blank cell
    legend = [t.get_text() for t in grid.legends[0].get_texts()]
    assert legend == ["bluish green: blood vessel", "orange: catheter"]
    assert isinstance(catalog.load("inference_report"), pd.DataFrame)


def test_inference_phrases_parameter_and_single_phrase_threshold(fake_project, tmp_path):  # noqa: F811
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(next(iter(fake_project.samples.values()))["image"]).save(inputs / "a.png")
    old = {"threshold": 0.5, "phrase": PHRASE}  # a frozen threshold of the single-phrase version
    outputs = _run_inference(fake_project, inputs, old).load("inference_outputs")
    assert sorted(outputs) == ["masks/blood_vessel/a.png", "overlays/a.png", "probabilities/blood_vessel/a.png"]
    outputs = _run_inference(fake_project, inputs, FROZEN, phrases=["Catheter."]).load("inference_outputs")
    assert "masks/catheter/a.png" in outputs and not any("blood_vessel" in k for k in outputs)
    with pytest.raises(Exception, match="no threshold for phrase"):
        _run_inference(fake_project, inputs, old, phrases=[CATHETER])
    outputs = _run_inference(fake_project, inputs, old, phrases=[CATHETER], threshold=0.3).load("inference_outputs")
    assert "masks/catheter/a.png" in outputs


def test_inference_on_a_missing_folder_names_it(fake_project, tmp_path):  # noqa: F811
    with pytest.raises(Exception, match="nope"):
        _run_inference(fake_project, tmp_path / "nope", FROZEN)


def test_inference_on_an_empty_folder_is_an_error_before_any_output(fake_project, tmp_path):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    pipeline = inference_pipeline()
    catalog = _catalog(pipeline, _params(fake_project, frozen_threshold=FROZEN,
                                         **{"params:inference": {**INFERENCE, "input_dir": str(empty)}}))
    with pytest.raises(EmptyInputFolderError, match="no readable image.*input_dir") as caught:
        SequentialRunner().run(pipeline, catalog)
    for name in ("inference_outputs", "inference_report", "inference_overlay_grid"):
        with pytest.raises(Exception):
            catalog.load(name)  # nothing was saved
    assert not fake_project.loads  # the model was not even loaded
    assert isinstance(caught.value, UserError)  # the CLI prints it as one message, no traceback
