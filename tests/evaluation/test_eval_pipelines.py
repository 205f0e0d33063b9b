"""The threshold, evaluation and inference pipelines end to end on the fake model (SequentialRunner)."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_fakes import EVALUATION, PHRASE, PREDICTION, THRESHOLD, fake_project  # noqa: F401  (fixture)
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from sa2va_pipeline.evaluation.overlays import DEFAULT_COLORS
from sa2va_pipeline.pipelines.evaluation import create_pipeline as evaluation_pipeline
from sa2va_pipeline.pipelines.inference import create_pipeline as inference_pipeline
from sa2va_pipeline.pipelines.threshold import create_pipeline as threshold_pipeline

INFERENCE = {
    "input_dir": None,
    "threshold": None,
    "save_probabilities": True,
    "save_overlays": True,
    "grid_images": 6,
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
        "params:phrase": PHRASE,
        "params:prediction": PREDICTION,
        "params:threshold": THRESHOLD,
        "params:evaluation": EVALUATION,
        "params:evaluation.overlay": EVALUATION["overlay"],
        **extra,
    }


def _run_threshold(project, stored=None) -> DataCatalog:
    pipeline = threshold_pipeline()
    catalog = _catalog(pipeline, _params(project, val_probabilities_stored=stored))
    SequentialRunner().run(pipeline, catalog)
    return catalog


def test_threshold_pipeline_freezes_a_val_threshold_and_reuses_maps(fake_project):  # noqa: F811
    catalog = _run_threshold(fake_project)
    frozen = catalog.load("frozen_threshold")
    sweep = catalog.load("threshold_sweep")
    assert frozen["chosen_on"] == "val" and frozen["n_images"] == 5
    assert frozen["threshold"] == pytest.approx(
        sweep.loc[sweep["dice_pooled"].idxmax(), "threshold"], abs=0.05
    )
    assert 0.4 <= frozen["threshold"] <= 0.6  # fake maps: vessels 0.45-0.95, background 0-0.55
    assert frozen["model"]["model_dir"] == str(fake_project.model_dir.resolve())
    assert len(sweep) == 91 and catalog.load("threshold_sweep_mlflow") is sweep
    assert catalog.load("frozen_threshold_mlflow") == frozen
    assert catalog.load("threshold_metrics")["chosen"] == {"value": frozen["threshold"], "step": 0}
    curves = catalog.load("threshold_sweep_curves")
    assert [p["step"] for p in curves["dice_pooled"]][:2] == [50, 60]
    fig = catalog.load("threshold_sweep_plot")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert {"Dice (pooled)", "precision (pooled)", "recall (pooled)"} <= set(labels)
    assert len(fake_project.loads) == 1
    # A second run with the stored maps of the same model predicts nothing.
    again = _run_threshold(fake_project, stored=catalog.load("val_probabilities"))
    assert len(fake_project.loads) == 1 and again.load("frozen_threshold")["threshold"] == frozen["threshold"]


def test_threshold_is_chosen_on_val_only_structurally():
    threshold, evaluation = threshold_pipeline(), evaluation_pipeline()
    assert not [name for name in threshold.datasets() if "test" in name]
    score_test = next(n for n in evaluation.nodes if n.name == "score_test")
    assert "frozen_threshold" in score_test.inputs and "test_probabilities" in score_test.inputs
    assert "frozen_threshold" not in evaluation.all_outputs()
    assert "frozen_threshold" in threshold.all_outputs()


def test_evaluation_pipeline_scores_val_and_test_at_the_frozen_threshold(fake_project):  # noqa: F811
    frozen_catalog = _run_threshold(fake_project)
    frozen = frozen_catalog.load("frozen_threshold")
    pipeline = evaluation_pipeline()
    catalog = _catalog(
        pipeline,
        _params(
            fake_project,
            frozen_threshold=frozen,
            val_probabilities=frozen_catalog.load("val_probabilities"),
            test_probabilities_stored=None,
        ),
    )
    SequentialRunner().run(pipeline, catalog)
    for split, n in (("val", 5), ("test", 4)):
        table = catalog.load(f"evaluation_per_image_{split}")
        summary = catalog.load(f"evaluation_summary_{split}")
        assert len(table) == n and summary["n_images"] == n and summary["threshold"] == frozen["threshold"]
        assert set(table.columns) >= {"dice", "iou", "precision", "recall", "specificity", "cldice", "hd95"}
        assert summary["provenance"]["same_model"] is True
        assert (
            catalog.load(f"evaluation_metrics_{split}")["dice_mean"]["value"]
            == summary["at_threshold"]["mean"]["dice"]["mean"]
        )
        overlays = catalog.load(f"evaluation_overlays_{split}")
        assert sorted(name.split("_")[0] for name in overlays) == ["best", "median", "worst"]
        assert catalog.load(f"evaluation_overlay_grid_{split}_mlflow") is catalog.load(
            f"evaluation_overlay_grid_{split}"
        )
    test_summary = catalog.load("evaluation_summary_test")
    # The empty test frame: HD95 undefined unless nothing is predicted there.
    assert (
        test_summary["at_threshold"]["mean"]["hd95"]["n"]
        + test_summary["at_threshold"]["mean"]["hd95"]["n_undefined"]
        == 4
    )
    assert fake_project.calls  # test maps were predicted, val maps came from the threshold run
    assert all(load[0] == str(fake_project.model_dir) for load in fake_project.loads)


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_inference_reports_unreadable_files_and_leaves_input_untouched(fake_project, tmp_path):  # noqa: F811
    inputs = tmp_path / "new images"
    inputs.mkdir()
    sample = next(iter(fake_project.samples.values()))
    Image.fromarray(sample["image"]).save(inputs / "frame one.png")
    Image.fromarray(sample["image"]).save(inputs / "frame one.jpg")  # same stem, other format
    (inputs / "broken.png").write_bytes(b"not a png at all")
    (inputs / "notes.txt").write_text("not an image")
    before = _tree_digest(inputs)
    listing_before = sorted(p.name for p in inputs.iterdir())

    pipeline = inference_pipeline()
    catalog = _catalog(
        pipeline,
        _params(
            fake_project,
            frozen_threshold={"threshold": 0.5},
            **{"params:inference": {**INFERENCE, "input_dir": str(inputs)}},
        ),
    )
    SequentialRunner().run(pipeline, catalog)

    assert _tree_digest(inputs) == before and sorted(p.name for p in inputs.iterdir()) == listing_before
    report = catalog.load("inference_report").set_index("file")
    assert report.loc["broken.png", "status"] == "unreadable" and report.loc["broken.png", "message"]
    assert report.loc["notes.txt", "status"] == "not_an_image"
    assert (
        report.loc["frame one.png", "status"] == "ok"
        and report.loc["frame one.png", "output_name"] == "frame one_png.png"
    )
    outputs = catalog.load("inference_outputs")
    assert sorted(outputs) == sorted(
        f"{kind}/frame one_{ext}.png"
        for kind in ("masks", "probabilities", "overlays")
        for ext in ("png", "jpg")
    )
    mask = np.asarray(Image.open(io.BytesIO(outputs["masks/frame one_png.png"])))
    expected = sample["image"][..., 0].astype(np.float32) / 255 >= 0.5
    np.testing.assert_array_equal(mask, expected.astype(np.uint8) * 255)
    overlay = np.asarray(Image.open(io.BytesIO(outputs["overlays/frame one_png.png"])).convert("RGB"))
    assert overlay.shape[0] > mask.shape[0]  # legend strip under the frame
    metrics = catalog.load("inference_metrics")
    assert metrics["n_images"]["value"] == 2 and metrics["n_skipped"]["value"] == 2
    assert isinstance(catalog.load("inference_report_mlflow"), pd.DataFrame)
    assert DEFAULT_COLORS["true_positive"] == tuple(EVALUATION["overlay"]["colors"]["true_positive"])


def test_inference_on_a_missing_folder_names_it(fake_project, tmp_path):  # noqa: F811
    pipeline = inference_pipeline()
    missing = tmp_path / "nope"
    catalog = _catalog(
        pipeline,
        _params(
            fake_project,
            frozen_threshold={"threshold": 0.5},
            **{"params:inference": {**INFERENCE, "input_dir": str(missing)}},
        ),
    )
    with pytest.raises(Exception, match="nope"):
        SequentialRunner().run(pipeline, catalog)
