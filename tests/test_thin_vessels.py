"""Thin vessels (issue 17): the soft-skeleton clDice loss and the resolution ceiling of benchmarks/thin_vessels.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sa2va_pipeline.model.cldice import cldice_loss, soft_skeleton

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("thin_vessels_bench", ROOT / "benchmarks" / "thin_vessels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _lines(n: int = 3, size: int = 64, width: int = 2) -> torch.Tensor:
    """n objects, each a horizontal and a vertical line of ``width`` px (a cross: one connected centreline)."""
    masks = torch.zeros(n, size, size)
    for i in range(n):
        r = 10 + 15 * i
        masks[i, r : r + width, 4:-4] = 1
        masks[i, 4:-4, r : r + width] = 1
    return masks


def _logits(masks: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    return (masks * 2 - 1) * scale


def test_cldice_zero_for_identical_masks() -> None:
    masks = _lines()
    assert float(cldice_loss(_logits(masks), masks)) < 1e-3


def test_cldice_larger_for_a_broken_centreline() -> None:
    truth = _lines(n=1, width=3)
    broken = truth.clone()
    broken[0, :, 30:36] = 0  # cut the horizontal line (and a bit of the vertical one): topology changes
    broken[0, 30:36, :] = 0
    loss_broken = float(cldice_loss(_logits(broken), truth))
    assert loss_broken > 0.05
    assert loss_broken > float(cldice_loss(_logits(truth), truth)) + 0.05


def test_cldice_is_differentiable_and_batched_over_objects() -> None:
    truth = _lines(n=2)
    logits = torch.zeros_like(truth, requires_grad=True)
    loss = cldice_loss(logits, truth, iterations=3)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # batched = mean of per-object losses
    per_object = [float(cldice_loss(logits[i : i + 1].detach(), truth[i : i + 1], iterations=3)) for i in range(2)]
    assert float(loss.detach()) == pytest.approx(sum(per_object) / 2, rel=1e-5)


def test_cldice_no_objects_and_shape_mismatch() -> None:
    logits = torch.zeros(0, 8, 8, requires_grad=True)
    loss = cldice_loss(logits, torch.zeros(0, 8, 8))
    assert float(loss) == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="differ"):
        cldice_loss(torch.zeros(1, 8, 8), torch.zeros(1, 4, 4))


def test_soft_skeleton_of_a_bar_is_thin() -> None:
    bar = torch.zeros(1, 1, 32, 32)
    bar[..., 10:17, 2:30] = 1  # 7 px thick
    skeleton = soft_skeleton(bar, iterations=5)
    assert skeleton.sum() < 0.4 * bar.sum()
    assert (skeleton * (1 - bar)).sum() == 0  # never outside the mask


def test_ceiling_perfect_at_full_grid_and_lower_for_thin_vessels_on_coarse_grids() -> None:
    bench = _bench()
    mask = np.zeros((256, 256), np.uint8)
    for r in (40, 100, 160, 220):
        mask[r : r + 2, 10:246] = 1  # 2 px lines
    mask[30:230, 60:62] = 1
    full = bench.mask_ceiling(mask, grid=256, sam2_size=256, path="probabilities")
    assert full["dice"] == pytest.approx(1.0) and full["cldice"] == pytest.approx(1.0)
    coarse = bench.mask_ceiling(mask, grid=32, sam2_size=128, path="probabilities")
    fine = bench.mask_ceiling(mask, grid=128, sam2_size=512, path="probabilities")
    assert coarse["dice"] < fine["dice"] <= 1.0
    logits = bench.mask_ceiling(mask, grid=32, sam2_size=128, path="logits")
    assert 0.0 <= logits["dice"] <= 1.0
    with pytest.raises(ValueError, match="path"):
        bench.mask_ceiling(mask, grid=32, sam2_size=128, path="nearest")


def _tiny_batch(model, size: int = 64):
    import random

    rng = np.random.default_rng(0)
    masks = np.zeros((1, size, size), np.uint8)
    masks[0, size // 2 : size // 2 + 2, 4:-4] = 1
    sample = {"id": "a", "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "masks": masks,
              "phrases": ["blood vessel"]}  # fmt: skip
    return model.collate([sample, sample], rng=random.Random(0))


def test_training_forward_adds_the_cldice_term_only_when_weighted() -> None:
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny")
    batch = _tiny_batch(model)
    off = model.training_forward(batch, mask_loss="dense")
    on = model.training_forward(batch, mask_loss="dense", cldice_weight=2.0, cldice_iterations=3)
    assert "mask_cldice" not in off
    assert 0.0 < float(on["mask_cldice"]) <= 1.0
    assert float(on["total"]) == pytest.approx(float(off["total"]) + 2.0 * float(on["mask_cldice"]), rel=1e-5)
    on["total"].backward()
    assert model.sam2.mask_decoder.conv_s0.weight.grad is not None


def test_high_mask_resolution_doubles_sam2_input_with_the_same_weights(tmp_path: Path) -> None:
    from sa2va_pipeline.model import Sa2VA

    model = Sa2VA.from_preset("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    high = Sa2VA.from_pretrained(tmp_path / "ckpt", mask_resolution="high")
    assert (high.sam2_image_size, high.mask_size) == (1024, 256)
    assert Sa2VA.from_pretrained(tmp_path / "ckpt").sam2_image_size == 512
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in high.state_dict().items())
    batch = _tiny_batch(high)
    assert batch["gt_masks"].shape[-1] == 256 and batch["sam2_pixel_values"].shape[-1] == 1024
    preset = Sa2VA.from_preset("tiny", mask_resolution="high")
    assert preset.mask_size == 256
    assert all(torch.equal(v, ref[k]) for k, v in preset.state_dict().items())  # same seed, same weights
    with pytest.raises(ValueError, match="standard | high"):
        Sa2VA.from_preset("tiny", mask_resolution="ultra")


def _training_params(**model: object) -> dict:
    import yaml

    params = yaml.safe_load((ROOT / "conf/base/parameters_training.yml").read_text())["training"]
    params["model"].update(model)
    return params


def test_training_config_mode_and_cldice_knobs_default_off_and_reach_the_model() -> None:
    from sa2va_pipeline.training.config import TrainingConfigError, load_training_config
    from sa2va_pipeline.training.prepare import build_model

    default = load_training_config(_training_params())
    assert default.model.mask_resolution == "standard" and default.loss.cldice_weight == 0.0
    assert "mask_resolution" not in default.model.describe()  # official-mode folders read as before
    params = _training_params(mask_resolution="high")
    params["loss"]["cldice_weight"] = 0.5
    config = load_training_config(params)
    assert config.model.describe()["mask_resolution"] == "high"
    assert config.loss.forward_kwargs()["cldice_weight"] == 0.5
    assert build_model(config.model, "cpu", seed=0).mask_size == 256
    with pytest.raises(TrainingConfigError, match="mask_resolution"):
        load_training_config(_training_params(mask_resolution="ultra"))


def test_high_mode_and_cldice_train_and_the_folder_rebuilds_the_same_predictor(tmp_path: Path) -> None:
    import json

    from sa2va_pipeline.training.artifacts import load_trained_model, save_trained_model
    from sa2va_pipeline.training.recipe import run_training

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, rng.integers(5, 55) :][:, :2] = 1
        image = np.full((64, 64, 3), 160, np.uint8)
        image[mask > 0] = 60
        samples.append({"id": f"f{i}", "image": image, "masks": mask[None], "phrases": ["blood vessel"]})
    params = {
        "model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}, "mask_resolution": "high"},
        "recipe": "tiny", "seed": 7, "num_threads": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "batch_size": 2, "loss": {"mask_loss": "dense", "cldice_weight": 1.0, "cldice_iterations": 3},
        "schedule": {"max_steps": 1, "epochs": None}, "eval": {"at_start": False, "interval": 0},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    }  # fmt: skip
    trained = run_training(samples, samples[:2], params, progress=False)
    assert trained.model.sam2_image_size == 128  # 64 x 2
    assert "loss_mask_cldice" in trained.result.history[-1]
    folder = save_trained_model(trained, tmp_path / "model")
    assert json.loads((folder / "model_source.json").read_text())["source"]["mask_resolution"] == "high"
    loaded = load_trained_model(folder, device="cpu", dtype=torch.float32)
    assert loaded.sam2_image_size == 128
    images = [s["image"] for s in samples[:2]]
    before = trained.model.predict_proba(images, "blood vessel")
    assert torch.allclose(before, loaded.predict_proba(images, "blood vessel"), atol=1e-5)
