"""Validation Dice during training: every val image x every trained phrase, per phrase and their macro mean.

Only a monitor of training (the threshold pipeline chooses the real thresholds, on the same split, with the
same library). Each (image, phrase) pair is predicted with ``model.predict_proba`` (the inference path; one
phrase per image, an image repeated for each phrase) and compared with that phrase's ground truth
(:func:`sa2va_pipeline.data.samples.phrase_truth`: empty where the image has no such object). Per pair, TP /
FP / FN / TN at every grid threshold (``threshold_sweep.threshold_counts``); per phrase, the mean per-image
Dice curve (``dice_from_counts``) and its best threshold (``best_index``: the project's one tie-break rule).

Reported (``validation_dice``): ``val_dice_best_threshold`` = the macro mean over phrases of each phrase's
mean Dice at its best threshold; per phrase ``val.<phrase>.dice_best_threshold`` / ``.best_threshold``;
for one phrase the old single-phrase numbers are unchanged.

Several ranks share the work: each predicts a contiguous share of the pairs (padded to equal length, so
every rank runs the same number of forward passes: under FSDP each one holds collectives), the counts are
gathered, and every rank computes the same metrics from all pairs in their original order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sa2va_pipeline.data.samples import phrase_truth
from sa2va_pipeline.evaluation.threshold_sweep import best_index, dice_from_counts, threshold_counts

if TYPE_CHECKING:
    from sa2va_pipeline.training.ranks import DistributedContext

COUNT_KEYS = ("tp", "fp", "fn", "tn")


def trained_phrases(samples: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct phrases of the training samples, in order of first appearance."""
    seen: dict[str, None] = {}
    for sample in samples:
        for phrase in sample["phrases"]:
            seen.setdefault(phrase, None)
    return list(seen)


def metric_name(phrase: str) -> str:
    """A phrase as MLflow accepts it inside a metric key (letters, digits, ``_-. /``)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", phrase)


def validation_dice(
    model: Any,
    samples: Sequence[dict[str, Any]],
    thresholds: Sequence[float],
    batch_size: int = 4,
    phrases: Sequence[str] | None = None,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """Predict every (sample, phrase) and sweep the thresholds (see the module docstring for the keys).

    ``phrases``: the trained phrases (default: those of ``samples``). With ``distributed`` every rank must call
    this with the same arguments; each predicts its share and all get the metrics of the whole set.
    """
    if not samples:
        raise ValueError("Validation needs at least one sample; the val split is empty.")
    phrases = list(phrases) if phrases else trained_phrases(samples)
    if not phrases:
        raise ValueError("Validation needs at least one phrase; neither the model nor the val split names one.")
    grid = np.asarray(sorted(thresholds), dtype=np.float64)
    pairs = [(s, p) for p in phrases for s in samples]  # phrase-major: each phrase's pairs are contiguous
    if distributed is None or distributed.world_size == 1:
        counts = pair_counts(model, pairs, grid, batch_size)
    else:
        counts = _counts_over_ranks(model, pairs, grid, batch_size, distributed)
    per_phrase = {p: metrics_from_counts(counts[i * len(samples) : (i + 1) * len(samples)], grid)
                  for i, p in enumerate(phrases)}
    return combine_phrases(per_phrase, grid)


def pair_counts(model: Any, pairs: Sequence[tuple[dict[str, Any], str]], grid: np.ndarray,
                batch_size: int = 4) -> np.ndarray:
    """TP, FP, FN, TN per (sample, phrase) pair and threshold: int64 [pairs, 4, thresholds]."""
    out = np.zeros((len(pairs), len(COUNT_KEYS), len(grid)), dtype=np.int64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        probs = model.predict_proba([s["image"] for s, _ in chunk], [p for _, p in chunk], batch_size=batch_size)
        for i, ((sample, phrase), prob) in enumerate(zip(chunk, probs)):
            prob = prob.detach().float().cpu().numpy() if hasattr(prob, "detach") else np.asarray(prob)
            counts = threshold_counts(prob, phrase_truth(sample, phrase), grid)
            out[start + i] = np.stack([counts[k] for k in COUNT_KEYS])
    return out


def metrics_from_counts(counts: np.ndarray, grid: np.ndarray) -> dict[str, Any]:
    """One phrase's metrics from its per-image counts [images, 4, thresholds]."""
    tp, fp, fn = (counts[:, COUNT_KEYS.index(k)].astype(np.float64) for k in ("tp", "fp", "fn"))
    mean_curve = dice_from_counts(tp, fp, fn).mean(axis=0)
    pooled_curve = dice_from_counts(tp.sum(axis=0), fp.sum(axis=0), fn.sum(axis=0))
    best = best_index(mean_curve)
    half = int(np.argmin(np.abs(grid - 0.5)))
    return {
        "val_dice_best_threshold": float(mean_curve[best]),
        "val_best_threshold": float(grid[best]),
        "val_dice_at_0.5": float(mean_curve[half]),
        "val_dice_pooled_best_threshold": float(pooled_curve[best_index(pooled_curve)]),
        "dice_per_threshold": [float(v) for v in mean_curve],
    }


def combine_phrases(per_phrase: dict[str, dict[str, Any]], grid: np.ndarray) -> dict[str, Any]:
    """Macro means over phrases plus each phrase's own numbers under ``val.<phrase>.*``."""
    rows = list(per_phrase.values())
    first = rows[0]
    out: dict[str, Any] = {
        "val_dice_best_threshold": float(np.mean([r["val_dice_best_threshold"] for r in rows])),
        "val_dice_at_0.5": float(np.mean([r["val_dice_at_0.5"] for r in rows])),
        "val_dice_pooled_best_threshold": float(np.mean([r["val_dice_pooled_best_threshold"] for r in rows])),
        # the first phrase's threshold (as the frozen-threshold JSON does for old readers)
        "val_best_threshold": first["val_best_threshold"],
        "dice_per_threshold": [float(v) for v in np.mean([r["dice_per_threshold"] for r in rows], axis=0)],
        "phrases": list(per_phrase),
    }
    for phrase, row in per_phrase.items():
        key = metric_name(phrase)
        out[f"val.{key}.dice_best_threshold"] = row["val_dice_best_threshold"]
        out[f"val.{key}.best_threshold"] = row["val_best_threshold"]
    return out


def _counts_over_ranks(model: Any, pairs: list[tuple[dict[str, Any], str]], grid: np.ndarray, batch_size: int,
                       ctx: DistributedContext) -> np.ndarray:
    """This rank's share of the pairs predicted here, everyone's counts gathered (rank order = pair order)."""
    import torch
    import torch.distributed as dist

    share = -(-len(pairs) // ctx.world_size)  # ceil
    mine = pairs[ctx.rank * share : (ctx.rank + 1) * share]
    # padding: repeats of a pair, predicted and then dropped, so every rank runs as many forwards
    padded = mine + [pairs[-1]] * (share - len(mine))
    tensor = torch.from_numpy(pair_counts(model, padded, grid, batch_size)).to(ctx.collective_device)
    gathered = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, tensor)
    everyone = np.concatenate([g.cpu().numpy() for g in gathered])
    # rank r's real pairs are rows [r * share, r * share + n_r) of the concatenation
    keep = [r * share + i for r in range(ctx.world_size) for i in range(max(0, min(share, len(pairs) - r * share)))]
    return everyone[keep]
