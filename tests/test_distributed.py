"""Multi-device training: 2 CPU worker processes (gloo) on the tiny preset, through ``run_training``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sa2va_pipeline.training.distributed import DistributedContext, check_supported, shard


def _samples(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, rng.integers(5, 55) :][:, :4] = 1
        image = np.full((64, 64, 3), 160, np.uint8)
        image[mask > 0] = 60
        out.append({"id": f"f{i}", "image": image, "masks": mask[None], "phrases": ["blood vessel"]})
    return out


def _params(tmp_path: Path, devices: int) -> dict:
    return {
        "model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}},
        "recipe": "tiny",
        "seed": 3,
        "device": "cpu",
        "devices": devices,
        "num_threads": 1,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optimizer": {"lr": 1e-3},
        "batch_size": 1,
        "schedule": {"max_steps": 2, "epochs": None},
        "eval": {"at_start": False, "interval": 0, "thresholds": [0.5]},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 0, "keep_last": 1},
    }


def test_shard_takes_contiguous_equal_shares():
    ctx = DistributedContext(rank=1, world_size=2, device="cpu", backend="gloo")
    assert shard([0, 1, 2, 3], ctx) == [2, 3]
    with pytest.raises(ValueError, match="does not split"):
        shard([0, 1, 2], ctx)


def test_time_budget_and_resume_need_one_device():
    from sa2va_pipeline.training.config import load_training_config

    config = load_training_config({"recipe": "tiny", "schedule": {"time_budget_s": 60, "epochs": None}})
    with pytest.raises(ValueError, match="time_budget_s"):
        check_supported(config)


@pytest.mark.slow
def test_two_cpu_workers_train_and_only_rank0_reports(tmp_path):
    from sa2va_pipeline.training.recipe import run_training

    logged: list[tuple[dict, int]] = []
    trained = run_training(_samples(4), _samples(2), _params(tmp_path, devices=2),
                           log_metrics=lambda m, s: logged.append((m, s)), progress=False)
    history = trained.result.history
    assert [row["step"] for row in history] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in history)
    # global batch = 1 per device x 2 devices
    assert trained.config.batch_size == 1 and trained.config.devices == 2
    # rank 0 alone logged: each training step exactly once, plus its validations
    steps = [s for m, s in logged if "loss" in m]
    assert steps == [1, 2]
    assert any("val_dice_best_threshold" in m for m, _ in logged)
    # the model came back to the parent, trained: it differs from the untrained preset it started from
    from sa2va_pipeline.model import Sa2VA

    fresh = Sa2VA.from_preset("tiny", sam2_image_size=64, seed=3)
    trained_w = trained.model.text_hidden_fcs[0].weight.detach().float()
    assert trained_w.shape == fresh.text_hidden_fcs[0].weight.shape
    assert not torch.allclose(trained_w, fresh.text_hidden_fcs[0].weight)
    # rank 0's checkpoint is where the config says; no other rank wrote there
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")) == ["step_00000002"]
