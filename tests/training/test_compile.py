"""``training.compile``: torch.compile'd LLM decoder layers train like eager ones (CPU inductor; slow: the
first step compiles, ~10-20 s on 2 cores); the mode reaches every layer and, under CUDA graphs
(``reduce-overhead``), the loop marks each step for cudagraph trees (fast: torch.compile replaced by a
recorder, nothing compiles)."""

from __future__ import annotations

import random
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stripe_frames import stripe_samples
from torch import nn

from sa2va_pipeline.training.recipe import run_training

_samples = partial(stripe_samples, seed=2, prefix="c")


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile replaced by a recorder of its ``mode`` that returns the function as it is (runs eager)."""
    calls: list = []

    def record(fn, *args, **kwargs):
        calls.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_compile_llm_layers_passes_the_mode_to_every_layer(compile_calls):
    from sa2va_pipeline.training.prepare import compile_llm_layers

    model = nn.Module()
    model.llm = nn.Module()
    model.llm.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    layout = SimpleNamespace(llm="llm.")
    assert compile_llm_layers(model, layout, "reduce-overhead") == 3
    assert compile_calls == ["reduce-overhead"] * 3
    compile_calls.clear()
    assert compile_llm_layers(model, layout) == 3 and compile_calls == [None] * 3  # torch's default mode
    assert model.llm.layers[0](torch.ones(1, 2)).shape == (1, 2)
    with pytest.raises(ValueError, match="no decoder layers"):
        compile_llm_layers(nn.Module(), SimpleNamespace(llm=""))


def test_the_trainer_compiles_with_the_configured_mode_and_pads_prompts(tmp_path, compile_calls, monkeypatch):
    """Through run_training (tiny model, CPU): every LLM layer gets the mode, batches are padded to the
    multiple, and on the CPU no cudagraph step is marked (CUDA graphs exist on CUDA devices only)."""
    from sa2va_pipeline.model.sa2va import Sa2VA

    marks, widths = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    collate = Sa2VA.collate

    def recording_collate(self, *args, **kwargs):
        batch = collate(self, *args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(Sa2VA, "collate", recording_collate)
    params = {
        "model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}}, "recipe": "tiny", "device": "cpu",
        "compile": "reduce-overhead", "pad_to_multiple": 64, "batch_size": 2, "prefetch": 0,
        "schedule": {"max_steps": 2, "epochs": None}, "eval": {"at_start": False, "interval": 0},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 0, "keep_last": 1},
    }
    run_training(_samples(4), [], params, progress=False)
    assert compile_calls == ["reduce-overhead"] * 2  # the tiny LLM's two decoder layers
    assert widths and all(w % 64 == 0 for w in widths)
    assert not marks


@pytest.mark.parametrize(("setting", "marked"), [("reduce-overhead", True), (True, False), (False, False)])
def test_the_loop_marks_each_step_for_cudagraph_trees_only_under_cuda_graphs(tmp_path, monkeypatch, setting,
                                                                            marked):
    """Once per optimiser step before its micro-batches (not between them: accumulated gradients must stay
    valid) and before each validation; the toy runs on the CPU, so the loop's CUDA check is emulated."""
    from training_toy_model import ToySa2VA, loss_fn, make_batch, make_samples

    from sa2va_pipeline.training.config import compile_uses_cudagraphs, load_training_config
    from sa2va_pipeline.training.prepare import prepare_for_training
    from sa2va_pipeline.training.trainer import TrainingLoop

    config = load_training_config({
        "model": {"preset": "toy"}, "recipe": "toy", "compile": setting, "batch_size": 2, "grad_accumulation": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "optimizer": {"lr": 1e-2}, "schedule": {"max_steps": 3},
        "eval": {"at_start": True, "interval": 0},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 0, "keep_last": 1},
    })
    prepared = prepare_for_training(ToySa2VA(), config.lora, config.trainable)
    model = prepared.model
    marks: list[int] = []  # the model's forward count at each mark
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(model.calls))
    loop = TrainingLoop(model, prepared.params_by_group, make_samples(), config, make_batch, loss_fn,
                        evaluate=lambda m: {"val_dice_best_threshold": 0.5}, progress=False)
    assert not loop.cudagraphs  # on the CPU, whatever the setting
    loop.cudagraphs = compile_uses_cudagraphs(config.compile, "cuda")  # as on a GPU
    loop.run()
    # validation at step 0, steps 1-3 (two micro-batches each), the final validation
    assert marks == ([0, 0, 2, 4, 6] if marked else [])


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tmp_path, fresh_dynamo):
    def run(compile_: bool) -> list[dict]:
        params = {
            "model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}},
            "recipe": "tiny",
            "seed": 5,
            "device": "cpu",
            "compile": compile_,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "optimizer": {"lr": 1e-3},
            "batch_size": 2,
            "prefetch": 0,
            "schedule": {"max_steps": 3, "epochs": None},
            "eval": {"at_start": False, "interval": 0},
            "checkpoint": {"dir": str(tmp_path / f"ckpt{compile_}"), "interval": 0, "keep_last": 1},
        }
        return run_training(_samples(6), [], params, progress=False).result.history

    eager = run(False)
    assert fresh_dynamo["stats"]["unique_graphs"] == 0
    compiled = run(True)
    # the layers really ran compiled: one graph shared by both decoder layers, no graph break
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1
    assert not fresh_dynamo["graph_break"]
    for key in ("loss", "loss_llm", "loss_mask_bce", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in compiled], [r[key] for r in eager], rtol=2e-4, err_msg=key)


@pytest.mark.slow
def test_compile_with_fsdp_and_gradient_checkpointing(fresh_dynamo, tmp_path):
    """Compiled after FSDP2 sharding (its hooks stay outside the graph) under transformers' gradient
    checkpointing: same loss and LoRA gradients as the plain eager model."""
    import torch.distributed as dist

    from sa2va_pipeline.training.config import LoraSettings, TrainableParts, load_training_config
    from sa2va_pipeline.training.fsdp import fsdp_shard
    from sa2va_pipeline.training.prepare import added_token_ids, build_model, compile_llm_layers, prepare_for_training
    from sa2va_pipeline.training.ranks import DistributedContext

    def prepared(checkpointing: bool):
        torch.manual_seed(0)
        config = load_training_config({"model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}}})
        model = build_model(config.model, "cpu", 3)
        return prepare_for_training(model, LoraSettings(r=4, alpha=8, dropout=0.0), TrainableParts(),
                                    added_token_ids(model), gradient_checkpointing=checkpointing)

    def loss_and_grads(model, batch):
        torch.manual_seed(0)
        model.training_forward(batch)["total"].backward()  # the first pass compiles
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model.training_forward(batch)["total"]
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            if ".lora_B." in n and p.grad is not None:
                grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        return float(loss.detach()), grads

    ref = prepared(False)
    batch = ref.model.collate(_samples(2), rng=random.Random(0))
    want_loss, want_grads = loss_and_grads(ref.model, batch)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = prepared(True)
        fsdp_shard(sharded.model, DistributedContext(0, 1, "cpu", "gloo"))
        assert compile_llm_layers(sharded.model, sharded.layout) == 2
        got_loss, got_grads = loss_and_grads(sharded.model, batch)
    finally:
        dist.destroy_process_group()
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1 and not fresh_dynamo["graph_break"]
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-6)
