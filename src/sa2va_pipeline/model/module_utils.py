"""Small torch helpers shared by the model's modules: parameter dtypes, autograd scopes, skipped init."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (the weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights as context
    return context()


def device_of(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (under FSDP deferred init an encoder can be real while the rest
    of the model is still on ``meta``)."""
    return next(module.parameters()).device


def dtype_of(module: nn.Module) -> torch.dtype:
    """Floating dtype of a module's first floating parameter (frozen and trainable parts may differ)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def cast_inputs_to_own_dtype(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: floating tensor inputs in the module's parameter dtype."""
    dtype = dtype_of(module)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def grad_scope(module: nn.Module) -> Any:
    """Autograd only if the module has a trainable parameter (and grad mode is on).

    Frozen-encoder policy: freezing an encoder (``requires_grad_(False)``) is all it takes to skip its graph.
    """
    trainable = any(p.requires_grad for p in module.parameters())
    return torch.set_grad_enabled(torch.is_grad_enabled() and trainable)
