"""Multi-device training: 2 CPU worker processes (gloo) on the tiny preset, through ``run_training``."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from stripe_frames import stripe_samples

from sa2va_pipeline.training.distributed import DistributedContext, check_supported, shard

_samples = partial(stripe_samples, seed=0)


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


def test_strategy_and_compile_settings_are_checked():
    from sa2va_pipeline.training.config import load_training_config

    config = load_training_config({})
    assert (config.strategy, config.compile) == ("ddp", False)
    assert load_training_config({"strategy": "fsdp", "compile": True}).strategy == "fsdp"
    with pytest.raises(ValueError, match="training.strategy must be one of ddp | fsdp.*'zero3'"):
        load_training_config({"strategy": "zero3"})
    with pytest.raises(TypeError, match="training.compile must be true or false"):
        load_training_config({"compile": "yes"})


def test_validation_metrics_from_counts_equal_the_threshold_sweep():
    """Validation sums per-image counts (so ranks can share the images); the numbers are the sweep's."""
    from sa2va_pipeline.evaluation.threshold_sweep import sweep_thresholds
    from sa2va_pipeline.training.validation import validation_dice

    rng = np.random.default_rng(4)
    samples = _samples(5)
    probs = rng.random((5, 64, 64)).astype(np.float32)
    probs[0] = 0.0  # an image with no prediction at all
    samples[1]["masks"] = np.zeros_like(samples[1]["masks"])  # an image without vessel

    class Fake:
        def predict_proba(self, images, phrases, batch_size):
            start = next(i for i, s in enumerate(samples) if s["image"] is images[0])
            return torch.from_numpy(probs[start : start + len(images)])

    grid = [0.2, 0.4, 0.5, 0.6, 0.8]
    got = validation_dice(Fake(), samples, grid, batch_size=2)
    sweep, _ = sweep_thresholds(list(probs), [s["masks"][0] > 0 for s in samples], np.asarray(grid))
    np.testing.assert_allclose(got["dice_per_threshold"], sweep["dice_mean"].to_numpy())
    assert got["val_dice_pooled_best_threshold"] == pytest.approx(sweep["dice_pooled"].max())
    best = int(np.argmax(sweep["dice_mean"].to_numpy()))
    assert got["val_best_threshold"] == grid[best]
    assert got["val_dice_best_threshold"] == pytest.approx(sweep["dice_mean"].iloc[best])
    assert got["val_dice_at_0.5"] == pytest.approx(sweep["dice_mean"].iloc[2])


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory) -> dict:
    """The same 3-step run on 2 CPU workers with DDP and with FSDP (same seed, global batch 2, dropout 0)."""
    from sa2va_pipeline.training.recipe import run_training

    runs = {}
    for strategy in ("ddp", "fsdp"):
        root = tmp_path_factory.mktemp(strategy)
        params = _params(root, devices=2)
        params["strategy"] = strategy
        params["schedule"]["max_steps"] = 3
        params["eval"].update(at_start=True, thresholds=VAL_THRESHOLDS)
        logged: list[tuple[dict, int]] = []
        trained = run_training(_samples(4), VAL, params, log_metrics=lambda m, s, out=logged: out.append((m, s)),
                               progress=False)
        runs[strategy] = {"trained": trained, "logged": logged, "ckpt": root / "ckpt"}
    return runs


VAL = _samples(3)  # 3 images over 2 ranks: shares of 2 and 1 (+ a padded copy that is dropped)
VAL_THRESHOLDS = [0.2, 0.4, 0.45, 0.5, 0.55, 0.6, 0.8]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_workers_train_and_only_rank0_reports(two_worker_runs, strategy):
    run = two_worker_runs[strategy]
    trained, logged = run["trained"], run["logged"]
    history = trained.result.history
    assert [row["step"] for row in history] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in history)
    assert trained.result.gradient_report["changed"]["lora"]
    # global batch = 1 per device x 2 devices
    assert trained.config.batch_size == 1 and trained.config.devices == 2 and trained.config.strategy == strategy
    # rank 0 alone logged: each training step exactly once, plus its validations (start and end)
    assert [s for m, s in logged if "loss" in m] == [1, 2, 3]
    assert [s for m, s in logged if "val_dice_best_threshold" in m] == [0, 3]
    # the model came back to the parent (reloaded from rank 0's trained-model folder), trained: it differs
    # from the untrained preset it started from
    from sa2va_pipeline.model import Sa2VA

    fresh = Sa2VA.from_preset("tiny", sam2_image_size=64, seed=3)
    trained_w = trained.model.text_hidden_fcs[0].weight.detach().float()
    assert trained_w.shape == fresh.text_hidden_fcs[0].weight.shape
    assert not torch.allclose(trained_w, fresh.text_hidden_fcs[0].weight)
    # the validation spread over both ranks equals validating the returned model here in one process
    from sa2va_pipeline.training.validation import validation_dice

    here = validation_dice(trained.model, VAL, VAL_THRESHOLDS, batch_size=4)
    np.testing.assert_allclose(trained.result.evaluations[-1]["dice_per_threshold"], here["dice_per_threshold"],
                               atol=1e-6)
    # rank 0's checkpoint is where the config says; no other rank wrote there
    assert sorted(p.name for p in run["ckpt"].iterdir() if p.name.startswith("step_")) == ["step_00000003"]


@pytest.mark.slow
def test_fsdp_loss_curve_and_saved_model_equal_ddp(two_worker_runs):
    from safetensors.torch import load_file

    ddp, fsdp = two_worker_runs["ddp"]["trained"], two_worker_runs["fsdp"]["trained"]
    # same global batch, seeds and per-rank prompts: the same run up to float summation order
    for key in ("loss", "loss_llm", "loss_mask_bce", "loss_mask_dice", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in fsdp.result.history], [r[key] for r in ddp.result.history],
                                   rtol=1e-4, err_msg=key)
    # the model handed back: same names, shapes, dtypes and (nearly) the same weights
    mine, theirs = fsdp.model.state_dict(), ddp.model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        assert (tensor.shape, tensor.dtype) == (theirs[name].shape, theirs[name].dtype), name
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-3, atol=1e-5)
    # checkpoints: full (unsharded) tensors under the same names as DDP's
    for file in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(str(two_worker_runs["fsdp"]["ckpt"] / "step_00000003" / file))
        b = load_file(str(two_worker_runs["ddp"]["ckpt"] / "step_00000003" / file))
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape for k in a)
