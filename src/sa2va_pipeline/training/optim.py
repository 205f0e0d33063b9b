"""AdamW over the trainable groups and the official learning-rate schedule.

Schedule (as the official xtuner recipe): linear warmup over ``warmup_ratio`` of the steps from
``warmup_start_factor`` x lr up to lr, then cosine decay to 0 at the last step. Weight decay applies to
every trainable tensor, as in the official recipe (no bias/norm exclusion).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sa2va_pipeline.training.config import OptimizerSettings
    from sa2va_pipeline.training.master_weights import MasterWeightAdamW


def build_optimizer(
    params_by_group: dict[str, list[tuple[str, torch.Tensor]]], settings: OptimizerSettings,
    master_weights: bool = False,
) -> tuple[torch.optim.AdamW | MasterWeightAdamW, list[list[str]]]:
    """AdamW with one param group per model group that has trainable tensors.

    ``master_weights``: the model computes with bf16 copies and the optimiser keeps the fp32 masters
    (:class:`~sa2va_pipeline.training.master_weights.MasterWeightAdamW`). Returns the optimiser and, per
    param group, the parameter names (used to save optimiser state by name).
    """
    import torch

    unknown = sorted(set(settings.lr_by_group) - set(params_by_group))
    groups, names = [], []
    for group, params in params_by_group.items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        if not trainable:
            continue
        lr = float(settings.lr_by_group.get(group, settings.lr))
        groups.append({"params": [p for _, p in trainable], "lr": lr, "initial_lr": lr, "name": group})
        names.append([n for n, _ in trainable])
    if not groups:
        raise ValueError("Nothing to train: every parameter is frozen. Check training.trainable.")
    if unknown:
        import logging

        logging.getLogger(__name__).warning("optimizer.lr_by_group names groups with nothing to train: %s", unknown)
    if master_weights:
        from sa2va_pipeline.training.master_weights import MasterWeightAdamW

        return MasterWeightAdamW(groups, tuple(settings.betas), settings.weight_decay), names
    # Per-tensor updates on CPU, one fused kernel on GPU: both bit-identical with and without resume.
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=tuple(settings.betas),
        weight_decay=settings.weight_decay,
        **({"fused": True} if on_gpu else {"foreach": False}),
    )
    return optimizer, names


def clip_gradients(optimizer: Any, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (a device tensor)."""
    import torch

    if hasattr(optimizer, "clip_grad_norm_"):  # MasterWeightAdamW: one reduction over its flat gradients
        return optimizer.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def supports_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` skips its update on the device when ``optimizer.found_inf`` (a device
    tensor, as ``GradScaler`` sets it) is 1: torch's fused AdamW and :class:`MasterWeightAdamW`."""
    from sa2va_pipeline.training.master_weights import MasterWeightAdamW

    return isinstance(optimizer, MasterWeightAdamW) or bool(getattr(optimizer, "defaults", {}).get("fused"))


def lr_factor(step: int, total_steps: int, warmup_ratio: float, start_factor: float) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based) out of ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup = int(math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return start_factor + (1.0 - start_factor) * step / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, settings: OptimizerSettings) -> float:
    """Set every group's lr for ``step`` and return the factor (a pure function of step: resume is exact)."""
    factor = lr_factor(step, total_steps, settings.warmup_ratio, settings.warmup_start_factor)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor
