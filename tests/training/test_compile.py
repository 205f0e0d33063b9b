"""``training.compile``: torch.compile'd LLM decoder layers train like eager ones (CPU inductor; slow: the
first step compiles, ~10-20 s on 2 cores)."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import pytest
import torch
from stripe_frames import stripe_samples

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
