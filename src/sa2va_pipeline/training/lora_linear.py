"""One LoRA Linear as one operator: ``x @ W^T + b + scaling * low @ B^T``, the low-rank sum written in place.

``torch.addmm(base_out, low, B^T)`` with a full [M, out] matrix as its first argument copies that matrix into
a new output before the GEMM adds to it: one device-to-device copy of every adapted Linear's output per
forward (7 per decoder layer; about 3% of a compiled sa2va-internvl3-2b training step on an H200, the
``Memcpy DtoD`` rows of ``benchmarks/profiles/profile_train_*_compiled_*``). Written as an in-place
``addmm_`` in eager code it needs no copy, but ``torch.compile`` turns the in-place op back into the copying
one. This custom operator is opaque to the compiler, so its forward keeps the in-place GEMM, and it brings
its own backward (the same products autograd takes through ``F.linear`` and ``addmm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("sa2va::lora_linear", mutates_args=())
def lora_linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor,
                   lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * low @ lora_b^T`` for 2-D ``x`` [M, in] and ``low`` [M, r]."""
    return F.linear(x, weight, bias).addmm_(low, lora_b.t(), alpha=scaling)


@lora_linear_2d.register_fake
def _(x, weight, bias, low, lora_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, low, lora_b, scaling = inputs
    ctx.scaling, ctx.has_bias = scaling, bias is not None
    ctx.save_for_backward(x if weight.requires_grad else None, weight, low, lora_b)


def _backward(ctx, grad):
    x, weight, low, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad @ weight if need[0] else None
    grad_weight = grad.t() @ x if need[1] else None
    grad_bias = grad.sum(0) if ctx.has_bias and need[2] else None
    grad_low = (grad @ lora_b) * ctx.scaling if need[3] else None
    grad_b = (grad.t() @ low) * ctx.scaling if need[4] else None
    return grad_x, grad_weight, grad_bias, grad_low, grad_b, None


lora_linear_2d.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`lora_linear_2d` over any leading dimensions, in ``low``'s dtype (what autocast gave the
    adapter's first product; the operator itself is not autocast, so its inputs are cast here)."""
    dtype = low.dtype
    x2, low2 = x.reshape(-1, x.shape[-1]).to(dtype), low.reshape(-1, low.shape[-1])
    bias = None if bias is None else bias.to(dtype)
    out = lora_linear_2d(x2, weight.to(dtype), bias, low2, lora_b.to(dtype), float(scaling))
    return out.view(*x.shape[:-1], out.shape[-1])
