"""A 2-fold cross-validation of tiny Sa2VA and the baseline through the pipeline: folds by group, every image
tested once, thresholds per fold, fold models stored, summaries with over-fold SD and group-bootstrap CIs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from evidence_fakes import PHRASES, dataset, fake_split_samples
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset

CONF = Path(__file__).resolve().parents[2] / "conf"


def _params() -> dict:
    return OmegaConfigLoader(conf_source=str(CONF), base_env="base", default_run_env="local")["parameters"]


def _tiny_training(params: dict, tmp_path: Path) -> dict:
    training = copy.deepcopy(params["training"])
    training["recipes"]["tiny"]["schedule"] = {"time_budget_s": None, "epochs": None, "max_steps": 1}
    training["model"]["overrides"] = {"sam2_image_size": 64}
    training["lora"] = {"r": 4, "alpha": 8}
    training["eval"]["at_start"] = False
    training["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    return training


@pytest.mark.slow
def test_two_fold_cross_validation_pipeline(tmp_path, monkeypatch):
    from sa2va_pipeline.evaluation import cross_validation
    from sa2va_pipeline.pipelines.cross_validation import create_pipeline

    params = _params()
    manifest, annotations, samples = dataset(n_videos=4, frames=2)  # two phrases: vessel, catheter
    monkeypatch.setattr(cross_validation, "split_samples", fake_split_samples(samples))
    cv = {**params["cross_validation"], "folds": 2, "val_fraction": 0.3, "include_baseline": True}
    baseline = {
        **params["baseline"],
        "network": {"filters": [4, 8, 16]},
        "image_size": 32,
        "max_steps": 2,
        "time_budget_s": 30,
        "device": "cpu",
    }
    evaluation = {**params["evaluation"], "bootstrap": {"n_resamples": 100, "seed": 0}}
    catalog = DataCatalog(
        {
            "split_manifest": MemoryDataset(manifest),
            "annotations": MemoryDataset(annotations),
            "params:cross_validation": MemoryDataset(cv),
            "params:training": MemoryDataset(_tiny_training(params, tmp_path)),
            "params:threshold": MemoryDataset(params["threshold"]),
            "params:evaluation": MemoryDataset(evaluation),
            "params:prediction": MemoryDataset({**params["prediction"], "device": "cpu"}),
            "params:baseline": MemoryDataset(baseline),
            "cross_validation_folds": FileFolderDataset(str(tmp_path / "folds")),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)

    summary = catalog.load("cross_validation_summary")
    assert (
        summary["folds"] == 2
        and summary["n_groups"] == 4
        and sorted(set(summary["fold_of_group"].values())) == [0, 1]
    )
    table = catalog.load("cross_validation_folds_table")
    assert set(table["model"]) == {"sa2va", "baseline"} and set(table["phrase"]) == set(PHRASES)
    assert len(table) == 2 * 2 * 2  # models x folds x phrases
    per_image = catalog.load("cross_validation_per_image")
    for model in ("sa2va", "baseline"):
        part = per_image[(per_image["model"] == model) & (per_image["phrase"] == "blood vessel")]
        assert sorted(part["id"]) == sorted(manifest["id"])  # every image tested exactly once
        assert (part.groupby("group")["fold"].nunique() == 1).all()
        over = summary["over_folds"][model]["blood vessel"]["dice_mean"]
        assert len(over["folds"]) == 2 and over["sd"] is not None
        pooled = summary["pooled_over_folds"][model]["catheter"]["mean"]["dice"]
        assert pooled["ci95"][0] <= pooled["mean"] <= pooled["ci95"][1]
    assert summary["comparison"]["phrases"]["blood vessel"]["dice"]["difference"]["n_groups"] == 4
    folds = catalog.load("cross_validation_folds")
    assert "fold_1/sa2va/trained_model/model_source.json" in folds.files
    assert "fold_0/baseline/baseline_model/model.safetensors" in folds.files
    frozen = json.loads(folds.path("fold_0/sa2va/frozen_threshold.json").read_text())
    assert set(frozen["thresholds"]) == set(PHRASES) and frozen["chosen_on"] == "val"
    assert catalog.load("cross_validation_figure").axes
    metrics = catalog.load("cross_validation_metrics")
    assert "sa2va.blood vessel.dice_mean_over_folds" in metrics
