"""The fused LoRA forward (one addmm) computes what peft's forward computes, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from sa2va_pipeline.training.lora import fuse_lora_forward


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_linear_equals_peft(dropout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"]), model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)  # peft starts B at zero: make the update visible
    reference = copy.deepcopy(model)
    assert fuse_lora_forward(model) == 2
    x = torch.randn(3, 5, 16)
    outputs, grads = [], []
    for m in (reference, model):
        torch.manual_seed(1)  # the same dropout masks
        out = m(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-4), name
    # a disabled adapter falls back to peft's own forward (the base layer alone)
    for sub in model.modules():
        if hasattr(sub, "disable_adapters") and hasattr(sub, "lora_A"):
            sub._disable_adapters = True
    base = nn.Sequential(model[0].base_layer, nn.ReLU(), model[2].base_layer)
    assert torch.equal(model(x), base(x))


def test_lora_linear_operator_gradients_with_a_trainable_base_and_autocast():
    """The operator's own backward: every input's gradient as autograd takes it through F.linear and addmm
    (base weight and bias trainable here, which the recipe never does), and under CPU bf16 autocast the
    inputs are cast to the adapter product's dtype as F.linear would cast them."""
    from sa2va_pipeline.training.lora_linear import lora_linear

    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 16), torch.randn(32, 16), torch.randn(32)
    low, lora_b = torch.randn(2, 5, 4), torch.randn(32, 4)
    leaves = [t.requires_grad_() for t in (x, w, b, low, lora_b)]
    want = torch.nn.functional.linear(x, w, b) + 0.5 * low @ lora_b.t()
    got = lora_linear(x, w, b, low, lora_b, 0.5)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for out in (want, got):
        out.backward(grad)
    expected = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    lora_linear(x, w, b, low, lora_b, 0.5).backward(grad)
    for t, e in zip(leaves, expected):
        torch.testing.assert_close(t.grad, e / 2)  # the first pass summed both outputs' gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low16 = torch.nn.functional.linear(x, torch.randn(4, 16))
        out = lora_linear(x, w, b, low16, lora_b, 0.5)
    assert low16.dtype == out.dtype == torch.bfloat16
