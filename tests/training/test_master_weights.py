"""bf16 compute weights with fp32 masters in the optimiser (training.master_weights: optimizer)."""

from __future__ import annotations

import pytest
import torch

from sa2va_pipeline.training.master_weights import MasterWeightAdamW, use_master_weights
from sa2va_pipeline.training.optim import clip_gradients
from sa2va_pipeline.training.recipe import run_training

from test_training_tiny import _params, _samples, stop_after_two_steps


def _pair(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (300,), (3, 4, 2)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    return ref, ours


def test_updates_equal_torch_fused_adamw_on_fp32_masters_with_clipping():
    ref, ours = _pair()
    reference = torch.optim.AdamW([{"params": ref[:2], "lr": 1e-2}, {"params": ref[2:], "lr": 3e-3}],
                                  betas=(0.9, 0.999), weight_decay=0.05, fused=True)
    groups = [{"params": ours[:2], "lr": 1e-2}, {"params": ours[2:], "lr": 3e-3}]
    optimizer = MasterWeightAdamW(groups, (0.9, 0.999), 0.05)
    assert all(p.dtype == torch.bfloat16 for p in ours)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) * 3 for p in ref]
        reference.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)
        for p, q, g in zip(ref, ours, grads):
            p.grad = g.bfloat16().float()  # the gradient our bf16 weights receive
            q.grad.add_(g.bfloat16())  # backward accumulates into the flat buffer's views
        norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        norm = clip_gradients(optimizer, ours, 1.0)
        assert torch.allclose(norm, norm_ref, rtol=1e-6)
        reference.step()
        optimizer.step()
    for p, q in zip(ref, ours):
        master = optimizer.masters[q]
        assert torch.allclose(master, p.detach(), rtol=0, atol=1e-6)  # clip: multiply vs divide
        assert torch.equal(q.detach(), master.bfloat16())  # the weights are the masters rounded
        assert torch.allclose(optimizer.state[q]["exp_avg"], reference.state[p]["exp_avg"], atol=1e-6)
    optimizer.masters_into_model()
    assert all(q.dtype == torch.float32 and q.grad is None for q in ours)


def test_a_gradient_that_left_the_flat_buffer_is_not_lost():
    _, ours = _pair()
    optimizer = MasterWeightAdamW([{"params": ours, "lr": 1e-2}], (0.9, 0.999), 0.0)
    before = optimizer.masters[ours[0]].clone()
    ours[0].grad = None  # model.zero_grad(set_to_none=True) somewhere else
    ours[0].grad = torch.ones_like(ours[0])  # a fresh gradient tensor, outside the buffer
    clip_gradients(optimizer, ours, 1e9)
    optimizer.step()
    assert torch.all(optimizer.masters[ours[0]] < before)  # a positive gradient lowered every weight


def test_auto_takes_the_optimizer_path_only_where_it_is_safe():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_master_weights("auto", cuda, torch.bfloat16, 1, False)
    assert not use_master_weights("auto", cuda, torch.bfloat16, 4, False)  # bf16 accumulation: no
    assert not use_master_weights("auto", cuda, torch.bfloat16, 1, True)  # DDP / FSDP keep their own
    assert not use_master_weights("auto", cpu, None, 1, False)
    assert use_master_weights("optimizer", cpu, torch.bfloat16, 4, False)
    with pytest.raises(ValueError, match="master_weights"):
        use_master_weights("optimizer", cpu, None, 1, False)


@pytest.mark.slow
def test_tiny_training_with_masters_in_the_optimizer_resumes_exactly(tmp_path, monkeypatch):
    """bf16 on the CPU: the run trains (gradient-reach check on the masters), a run stopped after its step-2
    checkpoint and resumed ends on the same weights, and the trained model holds fp32 trainable weights, as
    with master_weights: model."""
    train, val = _samples(6, 0), _samples(2, 1)
    over = {"precision": "bf16", "master_weights": "optimizer"}
    full = run_training(train, val, _params(tmp_path / "a", **over), progress=False)
    assert full.result.steps_done == 4 and all(full.result.gradient_report["changed"].values())
    trained = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    assert all(t.dtype == torch.float32 for t in trained.values())

    stop_after_two_steps(monkeypatch, train, val, _params(tmp_path / "b", **over))
    resumed = run_training(train, val, _params(tmp_path / "b", **over, checkpoint={"resume": True}), progress=False)
    assert resumed.result.steps_done == 4
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), trained[name]), name
    assert resumed.result.history[-1]["loss"] == full.result.history[-1]["loss"]
