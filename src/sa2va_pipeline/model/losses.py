"""Losses of the Sa2VA fine-tuning recipe.

Mask loss as the official recipe: 12,544 points per mask (3x oversampling, 75% most uncertain by -|logit|, the
rest uniform), targets by bilinear point sampling of the ground truth, BCE-with-logits (mean over points and
masks) and naive Dice (eps 1, mean over masks). ``dense`` variants use every pixel instead of points.
The LM loss is token-mean cross-entropy over supervised positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``inputs`` [N, C, H, W] at ``coords`` [N, P, 2] in [0, 1] -> [N, C, P]."""
    return F.grid_sample(inputs, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False)[..., 0]


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Point coordinates [N, num_points, 2]: the most uncertain of an oversampled set plus uniform ones."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits[:, None].float(), coords)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    random_coords = torch.rand(n, num_points - num_uncertain, 2, device=logits.device, generator=generator)
    return torch.cat([picked, random_coords], dim=1)


def dice_per_mask(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Naive Dice loss (1 - Dice) on sigmoid probabilities, one value per mask [N] (over its last dims)."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    dice = (2 * (probs * targets).sum(1) + eps) / (probs.sum(1) + targets.sum(1) + eps)
    return 1 - dice


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Naive Dice on sigmoid probabilities, per mask over the last dimension, mean over masks."""
    return dice_per_mask(logits, targets, eps).mean()


def mask_losses(
    logits: torch.Tensor,
    gt_masks: torch.Tensor,
    mode: str = "points",
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) between mask logits [N, h, w] and binary targets [N, h, w] ('points' or 'dense')."""
    bce, dice, _, _ = mask_losses_per_object(
        logits, gt_masks, mode, num_points, oversample_ratio, importance_sample_ratio, generator
    )
    return bce, dice


def mask_losses_per_object(
    logits: torch.Tensor,
    gt_masks: torch.Tensor,
    mode: str = "points",
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(BCE, Dice, BCE per object [N] detached, Dice per object [N] detached) of :func:`mask_losses`.

    The scalars are the means over the N objects (BCE over points and objects, as the official recipe; every
    object has the same number of points, so that is also the mean of the per-object values)."""
    logits = logits.float()
    gt_masks = gt_masks.to(logits)
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return zero, zero, logits.new_zeros(0), logits.new_zeros(0)
    if mode == "points":
        with torch.no_grad():
            coords = uncertain_point_coords(
                logits, num_points, oversample_ratio, importance_sample_ratio, generator
            )
            targets = point_sample(gt_masks[:, None], coords)[:, 0]
        preds = point_sample(logits[:, None], coords)[:, 0]
    elif mode == "dense":
        preds, targets = logits.flatten(1), gt_masks.flatten(1)
    else:
        raise ValueError(f"mask loss mode must be 'points' or 'dense', got {mode!r}")
    bce = F.binary_cross_entropy_with_logits(preds, targets, reduction="none")
    dice = dice_per_mask(preds, targets)
    return bce.mean(), dice.mean(), bce.detach().mean(1), dice.detach()


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into [B, T] of the positions whose next token is supervised, those next tokens), in
    row-major order. On the host this is free; on a GPU the mask's nonzero is a sync, which
    ``processing.host_positions`` avoids by calling this in collate."""
    following = labels[:, 1:]
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, following[rows, cols]


def lm_loss_at_positions(hidden: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                         lm_head: torch.nn.Module) -> torch.Tensor:
    """Next-token cross-entropy computing logits only at ``positions`` (:func:`supervised_positions`).

    Equal to the full-logits loss ``CE(lm_head(hidden)[:, :-1], labels[:, 1:])`` (mean over supervised
    tokens), without materialising [B, T, vocab] logits.
    """
    if positions.numel() == 0:
        return hidden.sum() * 0.0
    weight_dtype = next(p.dtype for p in lm_head.parameters() if p.is_floating_point())
    logits = lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions).to(weight_dtype))
    return F.cross_entropy(logits.float(), targets)


def lm_loss_at_labels(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """:func:`lm_loss_at_positions` with the positions found from ``labels`` where they are."""
    return lm_loss_at_positions(hidden, *supervised_positions(labels), lm_head)
