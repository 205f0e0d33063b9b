"""Paired per-image comparison of two models scored on the same images (e.g. Sa2VA and the baseline on test).

For each phrase and metric: both models' means over the images both scored, and the mean of the per-image
difference (first minus second) with a group-bootstrap 95% interval (``bootstrap.paired_difference``: videos
resampled, never frames). An interval that excludes 0 says the difference is larger than the spread between
videos explains; with ~5 test videos expect wide intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import METHOD, paired_difference

COMPARED = ("dice", "cldice", "iou", "precision", "recall", "hd95")


def _with_phrase(table: pd.DataFrame, default: str) -> pd.DataFrame:
    # single-phrase tables (older evaluations) have no phrase column: they score the one phrase
    return table if "phrase" in table.columns else table.assign(phrase=default)


def paired_comparison(
    first: pd.DataFrame,
    second: pd.DataFrame,
    groups: Mapping[str, Any],
    bootstrap: dict[str, Any] | None = None,
    names: tuple[str, str] = ("first", "second"),
    metrics: tuple[str, ...] = COMPARED,
) -> dict[str, Any]:
    """Compare two per-image tables (columns ``id``, ``phrase`` when several, metric columns) image by image.

    Raises:
        ValueError: the tables share no (image, phrase) pair.
    """
    bootstrap = bootstrap or {}
    n_resamples, seed = int(bootstrap.get("n_resamples", 2000)), int(bootstrap.get("seed", 0))
    default = (
        str(second["phrase"].iloc[0])
        if "phrase" in second.columns
        else str(first["phrase"].iloc[0])
        if "phrase" in first.columns
        else ""
    )
    a, b = _with_phrase(first, default), _with_phrase(second, default)
    out: dict[str, Any] = {
        "difference": f"{names[0]} - {names[1]}",
        "method": METHOD,
        "n_resamples": n_resamples,
        "seed": seed,
        "phrases": {},
    }
    for phrase in [p for p in b["phrase"].unique() if p in set(a["phrase"])]:
        left = a[a["phrase"] == phrase].set_index(a[a["phrase"] == phrase]["id"].astype(str))
        right = b[b["phrase"] == phrase].set_index(b[b["phrase"] == phrase]["id"].astype(str))
        common = [i for i in right.index if i in left.index]
        if not common:
            continue
        block: dict[str, Any] = {
            "n_images": len(common),
            "n_only_" + names[0]: int(len(left) - len(common)),
            "n_only_" + names[1]: int(len(right) - len(common)),
        }
        for metric in metrics:
            if metric not in left.columns or metric not in right.columns:
                continue
            x, y = left.loc[common, metric].astype(float), right.loc[common, metric].astype(float)
            block[metric] = {
                names[0]: float(np.nanmean(x)) if x.notna().any() else None,
                names[1]: float(np.nanmean(y)) if y.notna().any() else None,
                "difference": paired_difference(dict(x), dict(y), groups, n_resamples, seed),
            }
        if "threshold" in left.columns and "threshold" in right.columns:
            block["thresholds"] = {
                names[0]: float(left["threshold"].iloc[0]),
                names[1]: float(right["threshold"].iloc[0]),
            }
        out["phrases"][str(phrase)] = block
    if not out["phrases"]:
        raise ValueError(
            f"paired comparison: {names[0]} and {names[1]} share no scored (image, phrase); "
            "were they evaluated on the same split manifest?"
        )
    return out
