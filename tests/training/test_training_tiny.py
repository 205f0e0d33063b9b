"""Training the real tiny Sa2VA preset (small overrides, a handful of steps): exact resume, gradient reach,
and the trained-model folder round trip through load_trained_model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sa2va_pipeline.training.artifacts import load_trained_model, save_trained_model
from sa2va_pipeline.training.checkpoint import list_checkpoints, list_runs
from sa2va_pipeline.training.gradient_check import GradientReachError
from sa2va_pipeline.training.recipe import run_training
from sa2va_pipeline.training.trainer import NonFiniteLossError


def _samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        mask[:, rng.integers(5, 55) :][:, :4] = 1  # a vertical bar
        image = np.full((64, 64, 3), 160, np.uint8)
        image[mask > 0] = 60
        out.append({"id": f"f{i}", "image": image, "masks": mask[None], "phrases": ["blood vessel"]})
    return out


def _params(tmp_path: Path, **over) -> dict:
    params = {
        "model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}},
        "recipe": "tiny",
        "seed": 7,
        "num_threads": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "trainable": {"sam2_image_encoder": True},
        "optimizer": {"lr": 1e-3},
        "batch_size": 2,
        "grad_accumulation": 1,
        "loss": {"mask_loss": "points"},
        "schedule": {"max_steps": 4, "epochs": None},
        "eval": {"at_start": True, "interval": 0, "thresholds": [0.25, 0.5, 0.75]},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2, "keep_last": 3},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            params.setdefault(key, {}).update(value)
        else:
            params[key] = value
    return params


def stop_after_two_steps(monkeypatch, train: list[dict], val: list[dict], params: dict) -> None:
    """Run ``params`` with the loss turned NaN in step 3: the run stops after its step-2 checkpoint."""
    from sa2va_pipeline.model.sa2va import Sa2VA

    real_forward, calls = Sa2VA.training_forward, {"n": 0}

    def flaky_forward(self, batch, **kw):
        calls["n"] += 1
        out = real_forward(self, batch, **kw)
        if calls["n"] == 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(Sa2VA, "training_forward", flaky_forward)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run_training(train, val, params, progress=False)
    monkeypatch.setattr(Sa2VA, "training_forward", real_forward)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_tiny_resume_is_exact_and_artifact_round_trips(tmp_path, monkeypatch):
    train, val = _samples(6, 0), _samples(2, 1)
    full = run_training(train, val, _params(tmp_path / "a"), progress=False)
    assert full.result.steps_done == 4
    assert [e["step"] for e in full.result.evaluations] == [0, 4]

    # interrupted run: the loss turns NaN in step 3, after the step-2 checkpoint
    stop_after_two_steps(monkeypatch, train, val, _params(tmp_path / "b"))
    from sa2va_pipeline.model.sa2va import Sa2VA
    assert [p.name for p in list_checkpoints(list_runs(tmp_path / "b" / "ckpt")[-1])] == ["step_00000002"]

    torch.manual_seed(999)  # another process state; the checkpoint restores what matters
    resumed = run_training(train, val, _params(tmp_path / "b", checkpoint={"resume": True}), progress=False)
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert resumed.result.history[-1]["loss"] == pytest.approx(full.result.history[-1]["loss"], abs=1e-6)

    # the trained-model folder rebuilds the same predictor
    images = [s["image"] for s in val]
    before = full.model.predict_proba(images, "blood vessel")
    full.config.export_merged = True
    folder = save_trained_model(full, tmp_path / "model")
    assert {"adapter_config.json", "adapter_model.safetensors", "trained_weights.safetensors",
            "base_weights.safetensors", "model_source.json", "training_summary.json", "merged"} <= {
        p.name for p in folder.iterdir()
    }
    source = json.loads((folder / "model_source.json").read_text())
    assert source["source"] == {"kind": "preset", "preset": "tiny", "overrides": {"sam2_image_size": 64}, "seed": 7}
    loaded = load_trained_model(folder, device="cpu", dtype=torch.float32)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    after = loaded.predict_proba(images, "blood vessel")
    assert torch.allclose(before, after, atol=1e-5), float((before - after).abs().max())
    # the merged export is an official-layout checkpoint that Sa2VA.from_pretrained loads
    merged = Sa2VA.from_pretrained(folder / "merged").predict_proba(images, "blood vessel")
    assert torch.allclose(before, merged, atol=1e-5), float((before - merged).abs().max())
    # the adapter is plain peft: PeftModel reads it onto the InternVL model
    from peft import PeftModel

    base = Sa2VA.from_preset("tiny", seed=7, sam2_image_size=64)
    peft_model = PeftModel.from_pretrained(base.vlm, str(folder))
    assert any(".lora_A." in n for n, _ in peft_model.named_parameters())


@pytest.mark.slow
def test_tiny_gradient_reach_fails_when_parts_are_frozen(tmp_path):
    params = _params(tmp_path, trainable={"mask_decoder": False, "text_hidden_fcs": False}, eval={"at_start": False})
    with pytest.raises(GradientReachError, match="mask_decoder .*text_hidden_fcs"):
        run_training(_samples(4, 0), [], params, progress=False)


def test_custom_prompt_forms_are_validated():
    from sa2va_pipeline.training.config import load_training_config

    base = {"model": {"preset": "tiny"}, "recipe": "tiny"}
    ok = load_training_config({**base, "prompt": {"questions": ["Please segment {class_name}."], "answers": ["[SEG]."]}})
    assert ok.prompt.questions == ["Please segment {class_name}."]
    for bad in ({"questions": ["Segment it."]}, {"answers": ["Sure."]}, {"questions": []}):
        with pytest.raises(ValueError, match="training.prompt"):
            load_training_config({**base, "prompt": bad})
