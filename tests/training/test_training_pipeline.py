"""The training pipeline on the runner, the real parameters file, and the trained_model dataset."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from sa2va_pipeline.datasets.trained_model import TrainedModelDataset
from sa2va_pipeline.pipelines.training import create_pipeline
from sa2va_pipeline.training.artifacts import load_trained_model
from sa2va_pipeline.training.config import load_training_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def _params() -> dict:
    loader = OmegaConfigLoader(conf_source=str(CONF), base_env="base", default_run_env="local")
    return loader["parameters"]


def test_parameters_file_resolves_both_recipes():
    params = _params()["training"]
    tiny = load_training_config(params)
    assert tiny.recipe == "tiny" and tiny.model.preset == "tiny"
    assert tiny.trainable.sam2_image_encoder and tiny.optimizer.lr > 1e-4 and tiny.schedule.time_budget_s
    official = load_training_config({**params, "model": {"checkpoint": "/models/Sa2VA-1B"}})
    assert official.recipe == "official"
    assert (official.lora.r, official.lora.alpha, official.lora.dropout) == (128, 256, 0.05)
    assert official.optimizer.lr == 4e-5 and official.optimizer.weight_decay == 0.05
    assert official.trainable.embeddings == "full" and not official.trainable.sam2_image_encoder
    with pytest.raises(ValueError, match="training.optimizer.lrr"):
        load_training_config({**params, "optimizer": {"lrr": 1.0}})


def _manifest(tmp_path: Path) -> tuple[pd.DataFrame, list[dict]]:
    from sa2va_pipeline.data.annotations import mask_to_entry

    rows, entries = [], []
    for i, split in enumerate(["train"] * 4 + ["val"] * 2):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 10 + 5 * i : 14 + 5 * i] = 255
        image = np.where(mask[..., None] > 0, 60, 170).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(image).save(tmp_path / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / f"f{i}_mask.png")
        rows.append({"id": f"v{i}_frame_0", "image": str(tmp_path / f"f{i}.png"),
                     "mask": str(tmp_path / f"f{i}_mask.png"), "split": split})
        entries.append(mask_to_entry(f"f{i}.png", mask > 0, "blood vessel"))
    return pd.DataFrame(rows), entries


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_training_pipeline_writes_a_loadable_model(tmp_path, devices):
    """One device, and 2 CPU workers (gloo) through the same node: the same trained-model folder."""
    params = copy.deepcopy(_params()["training"])
    params["devices"] = devices
    params["device"] = "cpu"
    if devices > 1:
        params["batch_size"] = 1  # per device: the same global batch of 2
    params["recipes"]["tiny"]["schedule"] = {"time_budget_s": None, "max_steps": 2}
    params["model"]["overrides"] = {"sam2_image_size": 64}
    params["lora"] = {"r": 4, "alpha": 8}
    params["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    manifest, annotations = _manifest(tmp_path)
    catalog = DataCatalog(
        {
            "split_manifest": MemoryDataset(manifest),
            "annotations": MemoryDataset(annotations),
            "params:training": MemoryDataset(params, copy_mode="assign"),
            "trained_model": TrainedModelDataset(str(tmp_path / "trained_model"), version=None),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    summary = catalog.load("training_summary")
    assert summary["steps_done"] == 2 and summary["total_steps"] == 2
    assert summary["val_dice_best_threshold_untrained"] is not None and summary["val_dice_best_threshold"] is not None
    assert {c["group"] for c in summary["parameter_counts"] if c["trainable"]} >= {"lora", "mask_decoder", "text_hidden_fcs"}
    assert catalog.load("training_loss_curve").axes  # a matplotlib figure
    path = catalog.load("trained_model")
    assert {p.name for p in path.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "trained_weights.safetensors", "base_weights.safetensors",
        "model_source.json", "training_summary.json",
    }
    import json

    source = json.loads((path / "model_source.json").read_text())
    trained_tensors = source["trained_tensors"]
    # only what trained (the vision tower is frozen; the trainable SAM2 encoder of the tiny recipe is in)
    assert trained_tensors and not any(".vision_tower." in n for n in trained_tensors)
    assert any(n.startswith("sam2.vision_encoder.") for n in trained_tensors)
    assert source["training_config"]["devices"] == devices
    assert source["phrases"] == ["blood vessel"]  # what prediction.model_phrases reads
    model = load_trained_model(path, device="cpu", dtype=torch.float32)
    probs = model.predict_proba([np.full((64, 64, 3), 128, np.uint8)], "blood vessel")
    assert probs.shape == (1, 64, 64) and torch.isfinite(probs).all()


def test_trained_model_dataset_rejects_a_folder_without_model(tmp_path):
    from kedro.io.core import DatasetError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="model_source.json"):
        TrainedModelDataset(str(tmp_path / "empty")).load()
