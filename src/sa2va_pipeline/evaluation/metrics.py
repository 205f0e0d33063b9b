"""Per-image segmentation metrics for binary masks, with the conventions written down.

Every function takes a predicted mask and a ground-truth mask (2-D arrays, any dtype; non-zero is
foreground) of the same shape and returns a float.

Conventions (the same in the summary JSON and the README):

- Overlap metrics come from the confusion counts TP, FP, FN, TN (pixels).
  Dice = 2TP / (2TP + FP + FN); IoU = TP / (TP + FP + FN); precision = TP / (TP + FP);
  recall (sensitivity) = TP / (TP + FN); specificity = TN / (TN + FP).
- Both masks empty: Dice, IoU, precision, recall and clDice are 1 (nothing to find, nothing found).
- A ratio whose denominator is 0 while the image is not "both empty" is 0: an empty prediction on a
  frame with vessels has precision 0 (and recall 0); a non-empty prediction on a frame without vessels
  has recall 0 (and precision 0). A frame without any background pixel has specificity 1.
- clDice (Shit et al., CVPR 2021): skeletons by ``skimage.morphology.skeletonize``;
  Tprec = |S(P) & G| / |S(P)|, Tsens = |S(G) & P| / |S(G)|, clDice = 2 Tprec Tsens / (Tprec + Tsens);
  1 when both masks are empty, 0 when only one is.
- HD95 (pixels): the symmetric 95th percentile of surface distances, computed like medpy's
  ``medpy.metric.binary.hd95``: the surface of a mask is its foreground minus its binary erosion
  (``scipy.ndimage.binary_erosion`` with the 4-connected cross, pixels outside the image count as
  background); distances from every surface pixel of one mask to the nearest surface pixel of the
  other come from ``scipy.ndimage.distance_transform_edt``; both directions are pooled and
  ``numpy.percentile(..., 95)`` (linear interpolation) is taken. Both masks empty: 0. Exactly one
  mask empty: NaN (undefined); summaries exclude NaN from the mean and report how many there were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The order of the metric columns in every table this package writes.
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "precision", "recall", "specificity", "cldice", "hd95")


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of one predicted mask against its ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int


@dataclass(frozen=True)
class SkeletonCounts:
    """Pixel counts behind clDice: skeleton sizes and how much of each lies inside the other mask."""

    pred_skeleton: int
    pred_skeleton_in_truth: int
    truth_skeleton: int
    truth_skeleton_in_pred: int


def _as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {truth.shape}")


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> ConfusionCounts:
    """Count TP, FP, FN and TN pixels of ``pred`` against ``truth``."""
    p, t = _as_bool(pred), _as_bool(truth)
    _check_shapes(p, t)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = int(p.size) - tp - fp - fn
    return ConfusionCounts(tp=tp, fp=fp, fn=fn, tn=tn)


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if denominator > 0:
        return float(numerator) / float(denominator)
    return 1.0 if both_empty else 0.0


def overlap_metrics(counts: ConfusionCounts) -> dict[str, float]:
    """Dice, IoU, precision, recall and specificity from confusion counts (conventions: module docstring).

    Works the same for one image's counts and for counts summed over a whole split (pooled values).
    """
    tp, fp, fn, tn = counts.tp, counts.fp, counts.fn, counts.tn
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        # No background pixel at all means no chance of a false positive: specificity 1.
        "specificity": _ratio(tn, tn + fp, True),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient (F1 over pixels); 1 when both masks are empty."""
    return overlap_metrics(confusion_counts(pred, truth))["dice"]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard); 1 when both masks are empty."""
    return overlap_metrics(confusion_counts(pred, truth))["iou"]


def skeleton_counts(pred: np.ndarray, truth: np.ndarray) -> SkeletonCounts:
    """Skeletonise both masks (scikit-image) and count the overlaps clDice needs."""
    from skimage.morphology import skeletonize

    p, t = _as_bool(pred), _as_bool(truth)
    _check_shapes(p, t)
    sp = skeletonize(p) if p.any() else np.zeros_like(p)
    st = skeletonize(t) if t.any() else np.zeros_like(t)
    return SkeletonCounts(
        pred_skeleton=int(np.count_nonzero(sp)),
        pred_skeleton_in_truth=int(np.count_nonzero(sp & t)),
        truth_skeleton=int(np.count_nonzero(st)),
        truth_skeleton_in_pred=int(np.count_nonzero(st & p)),
    )


def cldice_from_counts(counts: SkeletonCounts) -> float:
    """clDice from skeleton counts; also valid for counts summed over images (pooled clDice)."""
    if counts.pred_skeleton == 0 and counts.truth_skeleton == 0:
        return 1.0
    if counts.pred_skeleton == 0 or counts.truth_skeleton == 0:
        return 0.0
    tprec = counts.pred_skeleton_in_truth / counts.pred_skeleton
    tsens = counts.truth_skeleton_in_pred / counts.truth_skeleton
    if tprec + tsens == 0:
        return 0.0
    return float(2 * tprec * tsens / (tprec + tsens))


def cldice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Centerline Dice (Shit et al. 2021) with scikit-image skeletons; 1 when both masks are empty."""
    return cldice_from_counts(skeleton_counts(pred, truth))


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion, generate_binary_structure

    cross = generate_binary_structure(2, 1)
    return mask & ~binary_erosion(mask, structure=cross, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels (medpy's definition, see module docstring).

    Returns 0 when both masks are empty and NaN when exactly one of them is.
    """
    from scipy.ndimage import distance_transform_edt

    p, t = _as_bool(pred), _as_bool(truth)
    _check_shapes(p, t)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    sp, st = _surface(p), _surface(t)
    # distance_transform_edt gives each pixel's distance to the nearest zero: zeros on the other surface.
    pred_to_truth = distance_transform_edt(~st)[sp]
    truth_to_pred = distance_transform_edt(~sp)[st]
    return float(np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), percentile))


def image_metrics(pred: np.ndarray, truth: np.ndarray, hd_percentile: float = 95.0) -> dict[str, float]:
    """All per-image metrics plus the raw counts that pooled values are computed from.

    Keys: ``dice, iou, precision, recall, specificity, cldice, hd95`` and the counts
    ``tp, fp, fn, tn, pred_skeleton, pred_skeleton_in_truth, truth_skeleton, truth_skeleton_in_pred``.
    """
    counts = confusion_counts(pred, truth)
    skel = skeleton_counts(pred, truth)
    row: dict[str, float] = dict(overlap_metrics(counts))
    row["cldice"] = cldice_from_counts(skel)
    row["hd95"] = hd95(pred, truth, hd_percentile)
    row.update(asdict(counts))
    row.update(asdict(skel))
    return row


def pooled_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity and clDice over all pixels of all images.

    ``rows`` are outputs of :func:`image_metrics` (or any mapping with the same count keys).
    """
    total = ConfusionCounts(*(int(sum(r[k] for r in rows)) for k in ("tp", "fp", "fn", "tn")))
    skel = SkeletonCounts(
        *(
            int(sum(r[k] for r in rows))
            for k in ("pred_skeleton", "pred_skeleton_in_truth", "truth_skeleton", "truth_skeleton_in_pred")
        )
    )
    out = overlap_metrics(total)
    out["cldice"] = cldice_from_counts(skel)
    return out
