"""Validation Dice during training: mean per-image Dice over a threshold grid, at its best threshold.

Only a monitor of training (the threshold pipeline chooses the real threshold, on the same split, with the
same library): probabilities come from ``model.predict_proba`` (the same path as inference), per-image
TP/FP/FN/TN at every grid threshold from :func:`sa2va_pipeline.evaluation.threshold_sweep.threshold_counts`.

Several workers (``training.devices`` > 1) share the work: each rank predicts a contiguous share of the
images (padded to equal length, so every rank runs the same number of forward passes: under FSDP each one
holds collectives), the per-image counts are gathered, and every rank computes the same metrics from all
images in their original order; rank 0 reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sa2va_pipeline.training.distributed import DistributedContext

COUNT_KEYS = ("tp", "fp", "fn", "tn")


def validation_dice(
    model: Any,
    samples: Sequence[dict[str, Any]],
    thresholds: Sequence[float],
    batch_size: int = 4,
    predict_kwargs: dict[str, Any] | None = None,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """Predict ``samples`` (dicts with ``image``, ``masks``, ``phrases``) and sweep the thresholds.

    Returns ``val_dice_best_threshold`` (mean per-image Dice at the best grid threshold),
    ``val_best_threshold``, ``val_dice_at_0.5``, ``val_dice_pooled_best_threshold`` and the mean-Dice
    curve under ``dice_per_threshold``. With ``distributed`` every rank must call this with the same
    ``samples``; each predicts its share and all get the metrics of the whole set.
    """
    if not samples:
        raise ValueError("Validation needs at least one sample; the val split is empty.")
    grid = np.asarray(sorted(thresholds), dtype=np.float64)
    if distributed is None or distributed.world_size == 1:
        counts = image_counts(model, list(samples), grid, batch_size, predict_kwargs)
    else:
        counts = _counts_over_ranks(model, list(samples), grid, batch_size, predict_kwargs, distributed)
    return metrics_from_counts(counts, grid)


def image_counts(
    model: Any,
    samples: Sequence[dict[str, Any]],
    grid: np.ndarray,
    batch_size: int = 4,
    predict_kwargs: dict[str, Any] | None = None,
) -> np.ndarray:
    """TP, FP, FN, TN per image and threshold: int64 [images, 4, thresholds] (``COUNT_KEYS`` order)."""
    from sa2va_pipeline.evaluation.threshold_sweep import threshold_counts

    kwargs = {k: v for k, v in (predict_kwargs or {}).items() if v is not None}
    out = np.zeros((len(samples), len(COUNT_KEYS), len(grid)), dtype=np.int64)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        phrases = [s["phrases"][0] for s in batch]
        probs = model.predict_proba([s["image"] for s in batch], phrases, batch_size=batch_size, **kwargs)
        probs = probs.detach().float().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
        for i, (sample, prob) in enumerate(zip(batch, probs)):
            masks = np.asarray(sample["masks"])
            truth = masks.reshape(-1, *masks.shape[-2:]).max(axis=0) > 0
            counts = threshold_counts(np.asarray(prob), truth, grid)
            out[start + i] = np.stack([counts[k] for k in COUNT_KEYS])
    return out


def metrics_from_counts(counts: np.ndarray, grid: np.ndarray) -> dict[str, Any]:
    """The validation metrics (see :func:`validation_dice`) from per-image counts [images, 4, thresholds]."""
    from sa2va_pipeline.evaluation.threshold_sweep import best_index, dice_from_counts

    tp, fp, fn = (counts[:, COUNT_KEYS.index(k)].astype(np.float64) for k in ("tp", "fp", "fn"))
    mean_curve = dice_from_counts(tp, fp, fn).mean(axis=0)
    pooled_curve = dice_from_counts(tp.sum(axis=0), fp.sum(axis=0), fn.sum(axis=0))
    best = best_index(mean_curve)
    half = int(np.argmin(np.abs(grid - 0.5)))
    return {
        "val_dice_best_threshold": float(mean_curve[best]),
        "val_best_threshold": float(grid[best]),
        "val_dice_at_0.5": float(mean_curve[half]),
        "val_dice_pooled_best_threshold": float(pooled_curve.max()),
        "dice_per_threshold": [float(v) for v in mean_curve],
    }


def _counts_over_ranks(
    model: Any,
    samples: list[dict[str, Any]],
    grid: np.ndarray,
    batch_size: int,
    predict_kwargs: dict[str, Any] | None,
    ctx: DistributedContext,
) -> np.ndarray:
    """This rank's share of the images predicted here, everyone's counts gathered (rank order = image order)."""
    import torch
    import torch.distributed as dist

    share = -(-len(samples) // ctx.world_size)  # ceil
    mine = samples[ctx.rank * share : (ctx.rank + 1) * share]
    n_real = len(mine)
    # padding: repeats of an image, predicted and then dropped, so every rank runs as many forwards
    padded = mine + [samples[-1]] * (share - n_real)
    local = image_counts(model, padded, grid, batch_size, predict_kwargs)
    device = ctx.device if ctx.backend == "nccl" else "cpu"  # NCCL gathers GPU tensors only
    tensor = torch.from_numpy(local).to(device)
    gathered = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, tensor)
    everyone = np.concatenate([g.cpu().numpy() for g in gathered])
    # rank r's real images are rows [r * share, r * share + n_r) of the concatenation
    keep = [r * share + i for r in range(ctx.world_size) for i in range(max(0, min(share, len(samples) - r * share)))]
    return everyone[keep]
