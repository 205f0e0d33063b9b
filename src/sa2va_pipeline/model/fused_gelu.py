"""The image encoders' MLPs with the GELU inside the up-projection's matmul (``Sa2VA.compile_for_inference``).

Every block of SAM2's Hiera trunk, of InternViT and of Qwen3-VL's vision tower runs ``fc2(gelu(fc1(x)))``
on a hidden four times the block's width. Compiled, ``fc1`` is a cuBLAS matmul and the GELU a separate kernel
that reads and writes that whole hidden again. ``torch._addmm_activation(..., use_gelu=True)`` applies bias
and GELU in the matmul's epilogue (cuBLASLt): on one H200 at batch 32 the up-projections of
sa2va-internvl3-2b went from 2.47 to 1.50 ms per image (``benchmarks/gelu_epilogue.py``, RESULTS.md).

On CUDA that epilogue computes GELU's tanh form, within 5e-4 of the exact (erf) GELU that Hiera and InternViT
use: below bf16's own rounding of those activations (its step is 8e-3 between 1 and 2). Qwen3-VL's tower uses
the tanh form already. On the CPU torch computes the exact GELU, so there the output is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# transformers' MLP classes whose forward is ``down(activation(up(x)))``, with their (up, activation, down)
# attributes; matched by name, since other modules with such attributes do more (Qwen3-VL's patch merger
# normalises first)
LAYOUTS = {
    "Sam2FeedForward": ("proj_in", "activation", "proj_out"),  # when it has two layers and no sigmoid
    "InternVLVisionMLP": ("fc1", "activation_fn", "fc2"),
    "Qwen3VLVisionMLP": ("linear_fc1", "act_fn", "linear_fc2"),
}
GELU_TYPES = ("GELUActivation", "GELUTanh", "PytorchGELUTanh")  # transformers' exact and tanh GELUs


def is_gelu(module: nn.Module) -> bool:
    """Whether ``module`` is a GELU (exact or tanh form): ``nn.GELU`` or transformers' GELU classes."""
    if isinstance(module, nn.GELU):
        return True
    if type(module).__name__ == "GELUActivation":  # with use_gelu_python it has its own formula: left alone
        return getattr(module, "act", None) is nn.functional.gelu
    return type(module).__name__ in GELU_TYPES


def mlp_layout(module: nn.Module) -> tuple[str, str, str] | None:
    """The layout (:data:`LAYOUTS`) of a two-layer GELU MLP whose up-projection is a biased ``nn.Linear``,
    else None."""
    layout = LAYOUTS.get(type(module).__name__)
    if layout is None:
        return None
    fc1, activation = getattr(module, layout[0]), getattr(module, layout[1])
    if type(fc1) is not nn.Linear or fc1.bias is None or not is_gelu(activation):
        return None
    if len(getattr(module, "layers", ())) or getattr(module, "sigmoid_output", False):
        return None  # Sam2FeedForward with hidden layers or a sigmoid: not fc2(gelu(fc1(x)))
    return layout


class FusedGeluMLP(nn.Module):
    """Mixin swapped in as the first base of an MLP's class: the same module (parameters, state dict keys),
    its forward with bias and GELU in the up-projection's matmul. The fused op has no backward, so where a
    gradient is wanted the MLP runs its own forward."""

    fused_layout: tuple[str, str, str]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        up, _, down = self.fused_layout
        fc1 = getattr(self, up)
        if torch.is_grad_enabled() and (hidden_states.requires_grad or fc1.weight.requires_grad):
            return super().forward(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        hidden = torch._addmm_activation(fc1.bias, flat, fc1.weight.t(), use_gelu=True)
        return getattr(self, down)(hidden.reshape(*hidden_states.shape[:-1], hidden.shape[-1]))


def fuse_gelu_mlps(module: nn.Module) -> int:
    """Give every GELU MLP under ``module`` that :func:`mlp_layout` knows the fused forward; returns how many.

    Only the class changes, so checkpoints load and save as before. An fp8 up-projection
    (:mod:`.fp8`, not a plain ``nn.Linear``) keeps its MLP as it is."""
    classes: dict[type, type] = {}
    count = 0
    for sub in module.modules():
        layout = None if isinstance(sub, FusedGeluMLP) else mlp_layout(sub)
        if layout is None:
            continue
        cls = type(sub)
        if cls not in classes:
            classes[cls] = type(f"FusedGelu{cls.__name__}", (FusedGeluMLP, cls), {"fused_layout": layout})
        sub.__class__ = classes[cls]
        count += 1
    return count
