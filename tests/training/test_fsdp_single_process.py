"""FSDP2 plumbing on a one-process gloo group (fast; the two-worker runs are in tests/test_distributed.py).

With one rank, sharding changes no number, so everything the trainer reads from a sharded model (losses,
gradients, the gradient-reach report, the clipped norm, checkpoint files, validation, the gathered final
model) must equal what it reads from the same model unsharded. The weights use the GPU layout (frozen bf16,
trainable fp32, bf16 autocast) so the mixed dtypes inside one shard group are exercised too.
"""

from __future__ import annotations

import gc
import random
import weakref
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stripe_frames import stripe_samples

from sa2va_pipeline.training.checkpoint import save_checkpoint
from sa2va_pipeline.training.config import LoraSettings, TrainableParts, load_training_config
from sa2va_pipeline.training.fsdp import fsdp_shard, gather_full_model, unsharded_skeleton
from sa2va_pipeline.training.gradient_check import GradientReachCheck
from sa2va_pipeline.training.optim import build_optimizer
from sa2va_pipeline.training.parameter_groups import named_parameters_by_group
from sa2va_pipeline.training.prepare import added_token_ids, build_model, prepare_for_training, trainable_to_fp32
from sa2va_pipeline.training.ranks import DistributedContext
from sa2va_pipeline.training.trainer import _full_tensor
from sa2va_pipeline.training.validation import validation_dice

REQUIRED = ["lora", "mask_decoder", "text_hidden_fcs"]


_samples = partial(stripe_samples, seed=1, width=6, background=170, vessel=50, prefix="v")


def _prepared():
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global RNG: the same for both models
    config = load_training_config({"model": {"preset": "tiny", "overrides": {"sam2_image_size": 64}}, "seed": 3})
    model = build_model(config.model, "cpu", config.seed, dtype=torch.bfloat16)
    prepared = prepare_for_training(
        model, LoraSettings(r=4, alpha=8, dropout=0.0), TrainableParts(sam2_image_encoder=True), added_token_ids(model)
    )
    trainable_to_fp32(model)
    return prepared


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield DistributedContext(rank=0, world_size=1, device="cpu", backend="gloo")
    finally:
        dist.destroy_process_group()


def _forward_backward(model, batch):
    torch.manual_seed(0)  # the same point sampling for both models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_forward(batch)
    out["total"].backward()
    return float(out["total"].detach())


def test_sharded_model_trains_checks_saves_validates_and_gathers_like_the_plain_one(one_rank, tmp_path):
    from torch.distributed.tensor import DTensor

    ref, sharded = _prepared(), _prepared()
    model = sharded.model
    original = weakref.ref(model.vlm.model.language_model.layers[0].mlp.up_proj.base_layer.weight)
    skeleton = unsharded_skeleton(model)
    units = fsdp_shard(model, one_rank)
    # the unsharded weights are gone once the caller drops its references (as the recipe does)
    sharded.params_by_group = {}
    gc.collect()
    assert original() is None
    # every decoder layer, vision-tower layer and SAM2 Hiera block is its own group, plus the two vocab matrices
    assert {"vlm.model.language_model.layers.0", "vlm.model.language_model.layers.1",
            "vlm.model.vision_tower.encoder.layer.0", "sam2.vision_encoder.backbone.blocks.0",
            "vlm.model.language_model.embed_tokens", "vlm.lm_head"} <= set(units)
    groups = named_parameters_by_group(model, sharded.layout)
    assert all(isinstance(p, DTensor) for params in groups.values() for _, p in params)
    # dtypes are kept: frozen bf16 and trainable fp32 side by side in one group (a decoder layer)
    layer = dict(model.vlm.model.language_model.layers[0].named_parameters())
    assert {p.dtype for n, p in layer.items() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in layer.items() if not p.requires_grad} == {torch.bfloat16}

    batch = model.collate(_samples(2), rng=random.Random(0))
    assert _forward_backward(model, batch) == pytest.approx(_forward_backward(ref.model, batch), rel=1e-5)
    ref_params = dict(ref.model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad and ref_params[name].grad is not None:
            assert isinstance(p.grad, DTensor) and p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, rtol=1e-4, atol=1e-6)

    # gradient-reach check and clipping read sharded gradients as global numbers
    checks = []
    for params_by_group in (groups, ref.params_by_group):
        check = GradientReachCheck(params_by_group, REQUIRED)
        check.before_step()
        checks.append(check.report.grad_norm)
    assert checks[0].keys() == checks[1].keys()
    for group in checks[1]:
        assert checks[0][group] == pytest.approx(checks[1][group], rel=1e-4)
    norms = [
        float(_full_tensor(torch.nn.utils.clip_grad_norm_([p for ps in g.values() for _, p in ps if p.requires_grad], 1.0)))
        for g in (groups, ref.params_by_group)
    ]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)

    # one optimiser step each, then checkpoints: the same files, full (unsharded) tensors
    config = load_training_config({})
    paths = []
    for name, params_by_group, m in (("fsdp", groups, model), ("plain", ref.params_by_group, ref.model)):
        optimizer, names = build_optimizer(params_by_group, config.optimizer)
        optimizer.step()
        paths.append(save_checkpoint(tmp_path / name, 1, m, optimizer, names, {}))
    for file in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(paths[0] / file)), load_file(str(paths[1] / file))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)

    # validation runs through the sharded model (predict_proba gathers the root's weights)
    val = _samples(3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = validation_dice(model, val, [0.3, 0.5, 0.7], batch_size=2, distributed=one_rank)
        want = validation_dice(ref.model, val, [0.3, 0.5, 0.7], batch_size=2)
    np.testing.assert_allclose(got["dice_per_threshold"], want["dice_per_threshold"], atol=1e-6)

    # the gathered model is plain (no DTensor, no FSDP class), on the CPU, same names / shapes / dtypes /
    # requires_grad as the unsharded model, with its weights
    full = gather_full_model(model, skeleton, one_rank)
    assert type(full).__name__ == "Sa2VA"
    mine, theirs = dict(full.named_parameters()), dict(ref.model.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert not isinstance(p, DTensor) and p.device.type == "cpu"
        assert (p.shape, p.dtype, p.requires_grad) == (theirs[name].shape, theirs[name].dtype, theirs[name].requires_grad)
        torch.testing.assert_close(p.detach(), theirs[name].detach(), rtol=1e-4, atol=1e-6)
    assert full.state_dict().keys() == ref.model.state_dict().keys()
