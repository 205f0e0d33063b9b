"""Soft-skeleton clDice loss (Shit et al., "clDice - a Novel Topology-Preserving Loss Function for Tubular
Structure Segmentation", CVPR 2021).

Dice rewards overlap, which thick vessels dominate; clDice compares centrelines instead: the share of the
predicted skeleton that lies inside the true mask (topology precision) and of the true skeleton inside the
predicted mask (topology sensitivity), combined as a harmonic mean. A broken thin vessel loses a piece of
the true skeleton however few pixels it has, so the loss sees it. The skeleton is made differentiable by
iterated soft erosion (min pooling) and soft opening (min then max pooling), as in the paper's reference code.

Used by ``Sa2VA.training_forward`` on the sigmoid probabilities of the mask logits against the ground
truth resized to the logits grid, batched over objects (``cldice_weight``, 0 = off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Soft erosion of [N, 1, H, W] maps: min over a 3x1 and a 1x3 cross (min pooling as -max(-x))."""
    vertical = -F.max_pool2d(-x, (3, 1), (1, 1), (1, 0))
    horizontal = -F.max_pool2d(-x, (1, 3), (1, 1), (0, 1))
    return torch.minimum(vertical, horizontal)


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Soft dilation of [N, 1, H, W] maps: max over a 3x3 window."""
    return F.max_pool2d(x, (3, 3), (1, 1), (1, 1))


def soft_open(x: torch.Tensor) -> torch.Tensor:
    """Soft morphological opening (erosion, then dilation)."""
    return soft_dilate(soft_erode(x))


def soft_skeleton(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Soft skeleton of [N, 1, H, W] maps in [0, 1] (the paper's Algorithm 1).

    ``iterations`` should reach the largest vessel radius in grid pixels: a structure thicker than that keeps
    an unskeletonised core (harmless for thin vessels, which are what the loss is for).
    """
    skeleton = F.relu(x - soft_open(x))
    for _ in range(iterations):
        x = soft_erode(x)
        delta = F.relu(x - soft_open(x))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def cldice_loss(
    logits: torch.Tensor, targets: torch.Tensor, iterations: int = 5, smooth: float = 1.0
) -> torch.Tensor:
    """1 - soft clDice between mask logits [N, h, w] and targets [N, h, w] in [0, 1], mean over the N objects.

    ``smooth`` keeps empty masks finite (an object with an empty ground truth is penalised only for the
    skeleton it predicts). Zero objects give a zero that still depends on ``logits`` (so backward works).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"cldice_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = logits.float().sigmoid()[:, None]
    truth = targets.to(probs)[:, None]
    skel_pred = soft_skeleton(probs, iterations)
    skel_true = soft_skeleton(truth, iterations)
    dims = (1, 2, 3)
    precision = ((skel_pred * truth).sum(dims) + smooth) / (skel_pred.sum(dims) + smooth)
    sensitivity = ((skel_true * probs).sum(dims) + smooth) / (skel_true.sum(dims) + smooth)
    cldice = 2.0 * precision * sensitivity / (precision + sensitivity)
    return (1.0 - cldice).mean()
