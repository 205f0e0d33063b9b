"""The MONAI baseline: trains in seconds, saves/loads exactly, and its pipeline scores and compares on the split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from evidence_fakes import PHRASES, dataset, fake_split_samples, kept_memory_dataset
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from sa2va_pipeline.baseline.recipe import (
    BaselineConfig,
    baseline_files,
    load_baseline,
    predict_baseline,
    train_baseline,
)
from sa2va_pipeline.datasets.file_folder_dataset import FileFolderDataset

PARAMS = {
    "network": {"filters": [4, 8, 16]},
    "image_size": 32,
    "batch_size": 4,
    "lr": 1e-2,
    "time_budget_s": 600,
    "max_steps": 6,
    "seed": 0,
    "device": "cpu",
}
EVALUATION = {"hd_percentile": 95, "reference_threshold": 0.5, "bootstrap": {"n_resamples": 100, "seed": 0}}
THRESHOLD = {"start": 0.05, "stop": 0.95, "step": 0.05, "objective": "pooled_dice"}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="lrr"):
        BaselineConfig.from_params({**PARAMS, "lrr": 1})
    with pytest.raises(ValueError, match="multiple of 4"):
        BaselineConfig.from_params({**PARAMS, "image_size": 30})


def test_train_predict_save_load_round_trip(tmp_path):
    _, _, samples = dataset()
    train = [s for i, s in samples.items() if not i.startswith(("v4", "v5"))]
    model = train_baseline(train, PHRASES, PARAMS)
    assert model.summary["steps_done"] == 6 and len(model.history) == 6
    maps = predict_baseline(model, list(samples.values()))
    assert set(maps) == set(PHRASES) and maps["catheter"]["v0_frame_0"].shape == (32, 32)
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in maps["blood vessel"].values())
    folder = FileFolderDataset(str(tmp_path / "baseline_model"))
    folder.save(baseline_files(model))
    again = predict_baseline(load_baseline(folder.load()), list(samples.values()))
    assert np.allclose(again["blood vessel"]["v5_frame_2"], maps["blood vessel"]["v5_frame_2"], atol=1e-6)
    with pytest.raises(ValueError, match="not a baseline model folder"):
        load_baseline(tmp_path)


def test_baseline_pipeline_scores_test_and_compares_with_sa2va(tmp_path, monkeypatch):
    from sa2va_pipeline.pipelines.baseline import create_pipeline, nodes

    manifest, annotations, samples = dataset()
    monkeypatch.setattr(nodes, "split_samples", fake_split_samples(samples))
    test_ids = manifest.loc[manifest["split"] == "test", "id"].tolist()
    sa2va = pd.DataFrame(
        {
            "id": test_ids * 2,
            "phrase": [PHRASES[0]] * 3 + [PHRASES[1]] * 3,
            "threshold": 0.5,
            "dice": 0.9,
            "cldice": 0.8,
        }
    )
    catalog = DataCatalog(
        {
            "split_manifest": MemoryDataset(manifest),
            "annotations": MemoryDataset(annotations),
            "params:baseline": MemoryDataset(PARAMS),
            "params:threshold": MemoryDataset(THRESHOLD),
            "params:evaluation": MemoryDataset(EVALUATION),
            "evaluation_per_image_test": MemoryDataset(sa2va),
            "evaluation_summary_test": MemoryDataset({"split": "test", "phrases": {"blood vessel": {}}}),
            "baseline_model": FileFolderDataset(str(tmp_path / "baseline_model")),
            "baseline_per_image": kept_memory_dataset(),
            "baseline_frozen_threshold": kept_memory_dataset(),
            "baseline_summary": kept_memory_dataset(),
            "baseline_comparison": kept_memory_dataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    frozen = catalog.load("baseline_frozen_threshold")
    assert frozen["phrases"] == PHRASES and frozen["chosen_on"] == "val"
    summary = catalog.load("baseline_summary")
    assert summary["phrases"]["catheter"]["threshold"] == frozen["thresholds"]["catheter"]["threshold"]
    assert set(summary["phrases"]) == set(PHRASES) and summary["n_images"] == 3
    dice = summary["phrases"]["blood vessel"]["at_threshold"]["mean"]["dice"]
    # one test video: a group bootstrap has nothing to resample, so no interval (not a zero-width one)
    assert dice["ci95"] == [None, None]
    assert "needs >= 2 groups" in summary["phrases"]["blood vessel"]["at_threshold"]["ci95_method"]["note"]
    per_image = catalog.load("baseline_per_image")
    assert len(per_image) == 6 and set(per_image["group"]) == {"v5"}
    comparison = catalog.load("baseline_comparison")
    block = comparison["phrases"]["blood vessel"]["dice"]
    assert block["difference"]["mean"] == pytest.approx(0.9 - block["baseline"])
    assert block["difference"]["n_groups"] == 1 and block["difference"]["low"] is None
    # summary.json again, the baseline beside Sa2VA
    both = catalog.load("evaluation_summary_test_with_baseline")
    assert both["split"] == "test" and both["phrases"] == {"blood vessel": {}}
    assert both["baseline"]["phrases"] == summary["phrases"] and both["baseline"]["comparison"] == comparison
