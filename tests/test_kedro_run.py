"""Smoke test of the whole chain (`kedro run`) through a real KedroSession on the `test` env (MLflow
tracking off), in a temporary copy of the project with a tiny sample and a two-step training run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

RUNTIME = {
    "sample_data": {"n_videos": 4, "frames_per_video": 2, "size": 128, "n_new_images": 2},
    "training": {
        "model": {"overrides": {"sam2_image_size": 64}},
        "lora": {"r": 4, "alpha": 8},
        "recipes": {"tiny": {"schedule": {"time_budget_s": None, "epochs": None, "max_steps": 2}}},
    },
}


def _latest(folder: Path, name: str) -> Path:
    """The file ``name`` of the newest version under a versioned entry's folder."""
    return sorted(folder.glob(f"*/{name}"))[-1]


@pytest.mark.slow
def test_default_pipeline_runs_end_to_end(kedro_project):
    from kedro.framework.session import KedroSession

    project = kedro_project
    with KedroSession.create(project_path=project, env="test", runtime_params=RUNTIME) as session:
        session.run(pipeline_names=["__default__"])  # every pipeline of the chain

    data = project / "data"
    if (project / "mlflow.db").exists():  # kedro-mlflow's metric datasets open the store, but log nothing
        import sqlite3

        with sqlite3.connect(project / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0
    manifest = pd.read_csv(_latest(data / "05_model_input/split_manifest.csv", "split_manifest.csv"))
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest.groupby("group")["split"].nunique().max() == 1  # no video in two splits
    training = json.loads(_latest(data / "08_reporting/training/training_summary.json", "training_summary.json").read_text())
    assert training["steps_done"] == 2
    threshold = json.loads(_latest(data / "08_reporting/threshold/frozen_threshold.json", "frozen_threshold.json").read_text())
    assert 0.05 <= threshold["threshold"] <= 0.95
    summary = json.loads(_latest(data / "08_reporting/evaluation/test/summary.json", "summary.json").read_text())
    assert summary["split"] == "test" and summary["threshold"] == threshold["threshold"]
    assert summary["n_images"] == int((manifest["split"] == "test").sum())
    masks = list((data / "07_model_output").rglob("masks/*.png"))
    assert len(masks) == 2  # one binary mask per new image
