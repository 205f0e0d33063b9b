"""The data pipelines through a real KedroSession (env ``test``: MLflow tracking off), run twice in a
temporary copy of the project: the second run must not overwrite any version of the first."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

VERSIONED = [
    "data/08_reporting/ingestion_report.csv",
    "data/03_primary/ingested_samples",
    "data/03_primary/ingestion_manifest.csv",
    "data/03_primary/ingestion_objects.json",
    "data/05_model_input/annotations.json",
    "data/08_reporting/annotation_report.csv",
    "data/05_model_input/split_manifest.csv",
]
RUNTIME = {"sample_data": {"n_videos": 4, "frames_per_video": 2, "size": 128, "n_new_images": 1}}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(project: Path) -> None:
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project, env="test", runtime_params=RUNTIME) as session:
        session.run(pipeline_names=["sample_data", "ingestion", "annotation", "split"])


@pytest.mark.slow
def test_two_runs_keep_every_version(kedro_project):
    project = kedro_project
    _run(project)
    first = {rel: _tree_digest(project / rel) for rel in VERSIONED}
    assert all(len({k.split("/")[0] for k in d}) == 1 for d in first.values()), first
    _run(project)
    for rel in VERSIONED:
        versions = sorted(p.name for p in (project / rel).iterdir())
        assert len(versions) == 2, f"{rel}: {versions}"
        now = _tree_digest(project / rel)
        for name, digest in first[rel].items():
            assert now[name] == digest, f"{rel}/{name} changed on the second run"

    manifest_path = sorted((project / "data/05_model_input/split_manifest.csv").glob("*/split_manifest.csv"))[0]
    manifest = pd.read_csv(manifest_path)
    assert len(manifest) == 8 and set(manifest["split"]) == {"train", "val", "test"}
    # the first run's manifest still points at files that exist (the first version of the folder)
    assert all(Path(p).is_file() for p in manifest["image"]) and "mask" not in manifest.columns
    assert all("/ingested_samples/" in p for p in manifest["image"])
    report = sorted((project / "data/08_reporting/ingestion_report.csv").glob("*/ingestion_report.csv"))[0]
    n_catheter = len(list((project / "data/01_raw/sample/masks/catheter").glob("*.png")))
    assert len(pd.read_csv(report)) == 16 + n_catheter
    assert (project / "data/01_raw/sample/.sa2va_synthetic.json").is_file()
    assert len(list((project / "data/01_raw/sample_new_images").glob("*.jpg"))) == 1
