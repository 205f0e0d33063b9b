"""Smoke tests of the chain through a real KedroSession on the `test` env (MLflow tracking off), in a
temporary copy of the project: the default run on a tiny synthetic sample, and a run from the user's own
``images/`` + ``annotations.json`` (two phrases, no ``masks/`` folder) that trains, thresholds, evaluates and
segments per phrase."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

TRAINING = {
    "model": {"overrides": {"sam2_image_size": 64}},
    "lora": {"r": 4, "alpha": 8},
    "recipes": {"tiny": {"schedule": {"time_budget_s": None, "epochs": None, "max_steps": 2}}},
}
RUNTIME = {
    "sample_data": {"n_videos": 4, "frames_per_video": 2, "size": 128, "n_new_images": 2},
    "training": TRAINING,
}
PHRASES = ["blood vessel", "catheter"]


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
    assert 0.05 <= threshold["threshold"] <= 0.95 and threshold["phrases"]
    summary = json.loads(_latest(data / "08_reporting/evaluation/test/summary.json", "summary.json").read_text())
    assert summary["split"] == "test" and summary["threshold"] == threshold["threshold"]
    assert list(summary["phrases"]) == threshold["phrases"] and "macro" in summary
    assert summary["n_images"] == int((manifest["split"] == "test").sum())
    masks = list((data / "07_model_output").rglob("masks/*/*.png"))
    assert len(masks) == 2 * len(threshold["phrases"])  # one binary mask per new image and phrase


def _frame(rng: np.random.Generator, structure: str) -> tuple[np.ndarray, list[float]]:
    """A 64x64 noisy frame with one dark structure and its polygon (a vessel: thin, a catheter: wide)."""
    image = rng.normal(170, 8, (64, 64)).clip(0, 255)
    x0, width = (int(rng.integers(10, 40)), 4) if structure == "blood vessel" else (int(rng.integers(8, 30)), 9)
    image[4:60, x0 : x0 + width] = 60
    polygon = [float(x0), 4.0, float(x0 + width), 4.0, float(x0 + width), 60.0, float(x0), 60.0]
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), polygon


def _annotations_folder(root: Path) -> Path:
    """raw/images/*.png + raw/annotations.json (Sa2VA format): frame 0 of each video shows a vessel, frame 1 a
    catheter; no masks/ folder. Plus two unlabelled frames for inference."""
    rng = np.random.default_rng(0)
    raw, new = root / "raw", root / "new images"
    (raw / "images").mkdir(parents=True)
    new.mkdir()
    entries = []
    for video in range(4):
        for frame, phrase in enumerate(PHRASES):
            name = f"video{video}_frame_{frame}.png"
            image, polygon = _frame(rng, phrase)
            Image.fromarray(image).save(raw / "images" / name)
            entries.append({"image": name, "text": [phrase], "mask": [[polygon]]})
    (raw / "annotations.json").write_text(json.dumps(entries))
    for i, phrase in enumerate(PHRASES):
        Image.fromarray(_frame(rng, phrase)[0]).save(new / f"new {i}.png")
    return raw


@pytest.mark.slow
def test_run_from_annotations_json_without_masks_trains_and_evaluates_per_phrase(kedro_project, tmp_path):
    from kedro.framework.session import KedroSession

    raw = _annotations_folder(tmp_path)
    runtime = {"raw_dir": str(raw), "input_dir": str(tmp_path / "new images"), "training": TRAINING}
    pipelines = ["ingestion", "annotation", "split", "training", "threshold", "evaluation", "inference"]
    with KedroSession.create(project_path=kedro_project, env="test", runtime_params=runtime) as session:
        session.run(pipeline_names=pipelines)

    assert not (raw / "masks").exists()
    data = kedro_project / "data"
    manifest = pd.read_csv(_latest(data / "05_model_input/split_manifest.csv", "split_manifest.csv"))
    assert len(manifest) == 8 and set(manifest["split"]) == {"train", "val", "test"}
    frozen = json.loads(_latest(data / "08_reporting/threshold/frozen_threshold.json", "frozen_threshold.json").read_text())
    assert frozen["phrases"] == PHRASES and set(frozen["thresholds"]) == set(PHRASES)
    for split in ("val", "test"):
        n = int((manifest["split"] == split).sum())
        per_image = pd.read_csv(_latest(data / f"08_reporting/evaluation/{split}/per_image.csv", "per_image.csv"))
        assert list(per_image.columns[:2]) == ["id", "phrase"] and len(per_image) == 2 * n  # every phrase, every image
        summary = json.loads(_latest(data / f"08_reporting/evaluation/{split}/summary.json", "summary.json").read_text())
        assert list(summary["phrases"]) == PHRASES and summary["macro"]["n_phrases"] == 2
        for phrase in PHRASES:
            assert summary["phrases"][phrase]["threshold"] == frozen["thresholds"][phrase]["threshold"]
    inference = sorted(p.relative_to(p.parents[2]).as_posix() for p in (data / "07_model_output").rglob("masks/*/*.png"))
    assert inference == [f"masks/{folder}/new {i}.png" for folder in ("blood_vessel", "catheter") for i in (0, 1)]


@pytest.mark.slow
def test_a_trained_model_is_scored_on_an_external_folder_at_its_frozen_thresholds(kedro_project, tmp_path):
    """A real tiny model trained from annotations.json, then `--pipelines=evaluation --params external_dir=...` on
    a folder in another layout (one mask folder per phrase): the frozen thresholds, the main outputs untouched."""
    from kedro.framework.session import KedroSession

    from sa2va_pipeline.session import ProjectSession

    raw = _annotations_folder(tmp_path)
    pipelines = ["ingestion", "annotation", "split", "training", "threshold", "evaluation"]
    with KedroSession.create(project_path=kedro_project, env="test",
                             runtime_params={"raw_dir": str(raw), "training": TRAINING}) as session:
        session.run(pipeline_names=pipelines)
    data = kedro_project / "data"
    main_summary = _latest(data / "08_reporting/evaluation/test/summary.json", "summary.json")
    main_bytes = main_summary.read_bytes()

    external = tmp_path / "external data"
    rng = np.random.default_rng(7)
    for video in range(2):
        for frame, phrase in enumerate(PHRASES):
            stem = f"other{video}_frame_{frame}"
            image, polygon = _frame(rng, phrase)
            (external / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(external / "images" / f"{stem}.png")
            x0, x1 = int(polygon[0]), int(polygon[2])
            mask = np.zeros((64, 64), np.uint8)
            mask[4:60, x0:x1] = 255
            (external / "masks" / phrase).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(external / "masks" / phrase / f"{stem}_mask.png")
    runtime = {"external_dir": str(external), "evaluation": {"bootstrap": {"n_resamples": 100}}}
    with ProjectSession.create(project_path=kedro_project, env="test", runtime_params=runtime) as session:
        session.run(pipeline_names=["evaluation"])

    assert main_summary.read_bytes() == main_bytes
    assert len([p for p in (data / "08_reporting/evaluation/test").rglob("summary.json") if p.is_file()]) == 1
    frozen = json.loads(_latest(data / "08_reporting/threshold/frozen_threshold.json", "frozen_threshold.json").read_text())
    summary = json.loads(_latest(data / "08_reporting/external/summary.json", "summary.json").read_text())
    assert summary["split"] == "external" and summary["n_images"] == 4 and summary["n_groups"] == 2
    assert summary["dataset"]["layout_detail"] == "masks/<phrase>/<stem>_mask.png"
    for phrase in PHRASES:
        assert summary["phrases"][phrase]["threshold"] == frozen["thresholds"][phrase]["threshold"]
        assert summary["phrases"][phrase]["n_images_with_phrase"] == 2
    assert summary["provenance"]["same_model"] is True  # thresholds frozen for this very model
    assert len(summary["macro"]["at_threshold"]["mean_ci95"]["dice"]) == 2
