"""The real conf/base entries: runtime-param override of input_dir, and the pipelines on the real catalog.

The catalog's relative paths are resolved inside a temp dir (chdir). MLflow copies are logged by the project
hook (not used here), so the catalog has no MLflow entries.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from eval_fakes import PHRASE, PHRASES, fake_project  # noqa: F401  (fixture)
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from sa2va_pipeline.pipelines.evaluation import create_pipeline as evaluation_pipeline
from sa2va_pipeline.pipelines.inference import create_pipeline as inference_pipeline
from sa2va_pipeline.pipelines.threshold import create_pipeline as threshold_pipeline

CONF = Path(__file__).resolve().parents[2] / "conf"


def _loader(**runtime_params) -> OmegaConfigLoader:
    return OmegaConfigLoader(
        conf_source=str(CONF), base_env="base", default_run_env="local", runtime_params=runtime_params or None
    )


def test_input_dir_defaults_and_is_overridden_by_runtime_params():
    assert _loader()["parameters"]["inference"]["input_dir"] == "data/01_raw/sample_new_images"
    params = _loader(input_dir="/somewhere/new images")["parameters"]
    assert params["inference"]["input_dir"] == "/somewhere/new images"


def _real_catalog(config: OmegaConfigLoader, project, pipelines) -> DataCatalog:
    catalog = DataCatalog.from_config(config["catalog"])
    catalog["trained_model"] = MemoryDataset(project.model_dir, copy_mode="assign")
    catalog["split_manifest"] = MemoryDataset(project.manifest)
    catalog["annotations"] = MemoryDataset(project.annotations)
    params = config["parameters"]
    params["phrase"] = PHRASE
    params["prediction"]["device"] = "cpu"
    for pipeline in pipelines:
        for name in pipeline.inputs():
            if name.startswith("params:"):
                value = params
                for key in name.removeprefix("params:").split("."):
                    value = value[key]
                catalog[name] = MemoryDataset(value, copy_mode="assign")
        for name in pipeline.datasets():
            dataset = catalog.get(name)
            if type(dataset).__name__ == "MlflowMetricsHistoryDataset":
                # Its save builds an MlflowClient (about 1 s, and a default store) even with logging off.
                catalog[name] = MemoryDataset()
            elif hasattr(dataset, "_logging_activated"):
                dataset._logging_activated = False  # what kedro-mlflow does when tracking is disabled
    return catalog


def test_pipelines_on_the_real_catalog(fake_project, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    new_images = tmp_path / "data/01_raw/sample_new_images"
    new_images.mkdir(parents=True)
    Image.fromarray(next(iter(fake_project.samples.values()))["image"]).save(new_images / "new.png")
    pipelines = [threshold_pipeline(), evaluation_pipeline(), inference_pipeline()]
    config = _loader()
    plain = DataCatalog.from_config(config["catalog"])
    assert type(plain.get("evaluation_per_image_test")).__module__ == "sa2va_pipeline.datasets.atomic_files"
    assert type(plain.get("evaluation_metrics_test")).__name__ == "MemoryDataset"
    catalog = _real_catalog(config, fake_project, pipelines)
    for pipeline in pipelines:
        SequentialRunner().run(pipeline, catalog)

    frozen = json.loads(
        next(Path("data/08_reporting/threshold/frozen_threshold.json").glob("*/*.json")).read_text()
    )
    summary_file = next(Path("data/08_reporting/evaluation/test/summary.json").glob("*/summary.json"))
    summary = json.loads(summary_file.read_text())
    assert summary["threshold"] == frozen["threshold"] and summary["split"] == "test"
    assert list(summary["phrases"]) == frozen["phrases"] == PHRASES and "macro" in summary
    per_image = next(Path("data/08_reporting/evaluation/test/per_image.csv").glob("*/per_image.csv"))
    assert per_image.read_text().splitlines()[0].startswith("id,phrase,threshold,")
    assert next(Path("data/08_reporting/threshold/threshold_sweep.png").glob("*/*.png")).stat().st_size > 10_000
    assert len(list(Path("data/08_reporting/evaluation/val/overlays").glob("*/overlays/*/*.png"))) == 6
    masks = sorted(Path("data/07_model_output/inference").glob("*/inference/masks/*/new.png"))
    assert [m.parent.name for m in masks] == ["blood_vessel", "catheter"]
    assert set(np.unique(np.asarray(Image.open(masks[0])))) <= {0, 255}
    loads = len(fake_project.loads)

    # Second threshold run: the stored val maps of the same model are read back from disk and re-used.
    catalog = _real_catalog(config, fake_project, pipelines[:1])
    SequentialRunner().run(pipelines[0], catalog)
    assert len(fake_project.loads) == loads
    assert len(list(Path("data/07_model_output/probabilities/val_probabilities.npz").iterdir())) == 2


@pytest.mark.parametrize(
    "entry", ["val_probabilities", "frozen_threshold", "evaluation_summary_val", "inference_outputs"]
)
def test_local_entries_are_versioned(entry):
    dataset = DataCatalog.from_config(_loader()["catalog"]).get(entry)
    assert dataset._version is not None
