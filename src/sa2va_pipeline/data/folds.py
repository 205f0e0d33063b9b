"""Cross-validation folds by group (video or patient): no group ever falls in two folds.

:func:`assign_folds` deals whole groups to ``k`` folds so that frame counts are as even as groups allow;
:func:`fold_manifest` turns one fold into a train / val / test manifest (test = the fold, val = a part of the
other folds held out by group, with the same assignment rule as the normal split), so every downstream
library (training, threshold sweep, evaluation) reads a fold exactly like the normal split manifest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from sa2va_pipeline.data.split import SplitError, assign_groups


def assign_folds(group_sizes: Mapping[str, int], n_folds: int, seed: int) -> dict[str, int]:
    """Assign every group to one of ``n_folds`` folds (0-based), balancing frame counts.

    Deterministic for a seed and a set of groups: groups are sorted, shuffled with ``seed``, the first
    ``n_folds`` start one fold each, then each next group goes to the fold with the fewest frames so far
    (ties: the lowest fold number).

    Raises:
        SplitError: ``n_folds`` < 2 or fewer groups than folds.
    """
    if int(n_folds) < 2:
        raise SplitError(f"cross_validation.folds must be >= 2, got {n_folds}")
    groups = sorted(group_sizes)
    if len(groups) < n_folds:
        raise SplitError(
            f"cannot make {n_folds} folds from {len(groups)} group(s): every fold needs at least one whole "
            "group (video/patient). Lower cross_validation.folds or change split.group_regex."
        )
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    filled = [0] * n_folds
    assignment: dict[str, int] = {}
    for index, group in enumerate(order):
        fold = index if index < n_folds else int(np.argmin(filled))
        assignment[group] = fold
        filled[fold] += int(group_sizes[group])
    return assignment


def add_folds(manifest: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """The manifest (every row, whatever its ``split``) with a ``fold`` column from :func:`assign_folds`
    over its ``group`` column."""
    if "group" not in manifest.columns:
        raise SplitError("the manifest has no 'group' column: pass the split manifest")
    out = manifest.copy()
    sizes = out.groupby("group").size().to_dict()
    out["fold"] = out["group"].map(assign_folds(sizes, int(n_folds), int(seed))).astype(int)
    return out


def fold_manifest(folded: pd.DataFrame, fold: int, val_fraction: float, seed: int) -> pd.DataFrame:
    """Train / val / test manifest of one fold: ``split`` = test for the fold's rows; the other folds' groups
    are divided into train and val (``val_fraction`` of their frames, whole groups) as the split pipeline does.

    Raises:
        SplitError: the other folds hold fewer than two groups (no room for a validation part), or
            ``val_fraction`` is not in (0, 1).
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise SplitError(f"cross_validation.val_fraction must be in (0, 1), got {val_fraction}")
    out = folded.drop(columns=["split"], errors="ignore").copy()
    rest = out[out["fold"] != fold]
    sizes = rest.groupby("group").size().to_dict()
    try:
        inner = assign_groups(
            sizes, {"train": 1.0 - float(val_fraction), "val": float(val_fraction)}, int(seed)
        )
    except SplitError as error:
        raise SplitError(f"fold {fold}: {error}") from None
    out["split"] = np.where(out["fold"] == fold, "test", out["group"].map(inner))
    return out.reset_index(drop=True)
