"""Validation Dice during training: every val image x every trained phrase, per phrase and their macro mean.

Only a monitor of training (the threshold pipeline chooses the real thresholds, on the same split, with the
same library). Every phrase is predicted on every image by the project's one prediction engine
(:func:`sa2va_pipeline.prediction.predict_maps`, float16 maps, through ``model.predict_proba``: under FSDP
that is a registered forward method, the streaming generator is not) and compared with that phrase's truth
(:func:`sa2va_pipeline.data.samples.phrase_truth`: empty where the image has no such object). Per pair, TP /
FP / FN / TN at every grid threshold (``threshold_sweep.threshold_counts``); per phrase, the mean per-image
Dice curve (``dice_from_counts``) and its best threshold (``best_index``: the project's one tie-break rule).

Reported (``validation_dice``): ``val_dice_best_threshold`` = the macro mean over phrases of each phrase's
mean Dice at its best threshold; per phrase ``val_dice_best_threshold.<phrase>`` / ``val_best_threshold.<phrase>``
(``evaluation.report.metric_key`` makes the phrase MLflow-safe); for one phrase the old single-phrase numbers
are unchanged.

Several ranks share the work: each predicts a contiguous share of the images, all phrases (padded to equal
length, so every rank runs the same number of forward passes: under FSDP each one holds collectives), the
counts are gathered, and every rank computes the same metrics from all images in their original order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sa2va_pipeline.data.samples import phrase_truth
from sa2va_pipeline.evaluation.report import metric_key
from sa2va_pipeline.evaluation.threshold_sweep import best_index, dice_from_counts, threshold_counts
from sa2va_pipeline.prediction import dequantise, predict_maps

if TYPE_CHECKING:
    from sa2va_pipeline.training.ranks import DistributedContext

COUNT_KEYS = ("tp", "fp", "fn", "tn")
# Images per call of the prediction engine: bounds the maps held at once (images x phrases).
CHUNK_IMAGES = 32


def trained_phrases(samples: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct phrases of the training samples, in order of first appearance."""
    seen: dict[str, None] = {}
    for sample in samples:
        for phrase in sample["phrases"]:
            seen.setdefault(phrase, None)
    return list(seen)


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
    if distributed is None or distributed.world_size == 1:
        counts = image_phrase_counts(model, list(samples), phrases, grid, batch_size)
    else:
        counts = _counts_over_ranks(model, list(samples), phrases, grid, batch_size, distributed)
    per_phrase = {p: metrics_from_counts(counts[:, i], grid) for i, p in enumerate(phrases)}
    return combine_phrases(per_phrase, grid)


class _Eager:
    """A model seen by the prediction engine through ``predict_proba`` (one call per chunk) instead of the
    ``iter_predict_proba`` generator: FSDP gathers the root's weights around registered forward methods, and
    a generator would run after the gather's end."""

    def __init__(self, model: Any):
        self.model = model

    def iter_predict_proba(self, images: list[Any], phrases: list[str], batch_size: int = 8, **kw: Any) -> Iterator:
        return iter(self.model.predict_proba(images, phrases, batch_size=batch_size, **kw))


def image_phrase_counts(model: Any, samples: Sequence[dict[str, Any]], phrases: Sequence[str], grid: np.ndarray,
                        batch_size: int = 4) -> np.ndarray:
    """TP, FP, FN, TN per image, phrase and threshold: int64 [images, phrases, 4, thresholds]."""
    out = np.zeros((len(samples), len(phrases), len(COUNT_KEYS), len(grid)), dtype=np.int64)
    for start in range(0, len(samples), CHUNK_IMAGES):
        chunk = samples[start : start + CHUNK_IMAGES]
        maps = predict_maps(_Eager(model), chunk, phrases, batch_size=batch_size, storage_dtype="float16").maps
        for i, sample in enumerate(chunk):
            for k, phrase in enumerate(phrases):
                prob = dequantise(maps[(str(sample["id"]), phrase)])
                counts = threshold_counts(prob, phrase_truth(sample, phrase), grid)
                out[start + i, k] = np.stack([counts[key] for key in COUNT_KEYS])
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
        key = metric_key(phrase)
        out[f"val_dice_best_threshold.{key}"] = row["val_dice_best_threshold"]
        out[f"val_best_threshold.{key}"] = row["val_best_threshold"]
    return out


def _counts_over_ranks(model: Any, samples: list[dict[str, Any]], phrases: Sequence[str], grid: np.ndarray,
                       batch_size: int, ctx: DistributedContext) -> np.ndarray:
    """This rank's share of the images predicted here, everyone's counts gathered (rank order = image order)."""
    import torch
    import torch.distributed as dist

    share = -(-len(samples) // ctx.world_size)  # ceil
    mine = samples[ctx.rank * share : (ctx.rank + 1) * share]
    # padding: repeats of an image, predicted and then dropped, so every rank runs as many forwards
    padded = mine + [samples[-1]] * (share - len(mine))
    local = image_phrase_counts(model, padded, phrases, grid, batch_size)
    tensor = torch.from_numpy(local).to(ctx.collective_device)
    gathered = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, tensor)
    everyone = np.concatenate([g.cpu().numpy() for g in gathered])
    # rank r's real images are rows [r * share, r * share + n_r) of the concatenation
    keep = [r * share + i for r in range(ctx.world_size) for i in range(max(0, min(share, len(samples) - r * share)))]
    return everyone[keep]
