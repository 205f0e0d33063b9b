"""The threshold-sweep plot: Dice, precision and recall against threshold, the chosen one marked."""

from __future__ import annotations

from typing import Any

import pandas as pd


def threshold_sweep_figure(sweep: pd.DataFrame, chosen: dict[str, Any] | None = None, title: str = "") -> Any:
    """A matplotlib figure of a sweep table from :func:`~.threshold_sweep.sweep_thresholds`.

    Draws pooled Dice, mean per-image Dice (with a +-1 SD band), pooled precision and pooled recall;
    a dashed vertical line marks ``chosen["threshold"]`` when given. Precision is left out where nothing
    is predicted (its 0 there is a convention, not a measurement).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.8), dpi=110)
    ax = fig.subplots()
    t = sweep["threshold"]
    ax.plot(t, sweep["dice_pooled"], color="black", lw=2, label="Dice (pooled)")
    ax.plot(t, sweep["dice_mean"], color="tab:purple", lw=1.5, label="Dice (mean per image)")
    ax.fill_between(
        t,
        sweep["dice_mean"] - sweep["dice_sd"],
        sweep["dice_mean"] + sweep["dice_sd"],
        color="tab:purple",
        alpha=0.15,
        label="mean Dice +- 1 SD",
    )
    predicted = (sweep["tp"] + sweep["fp"]) > 0
    precision = sweep["precision_pooled"].where(predicted)
    ax.plot(t, precision, color="tab:red", lw=1.5, label="precision (pooled)")
    ax.plot(t, sweep["recall_pooled"], color="tab:blue", lw=1.5, label="recall (pooled)")
    if chosen is not None:
        ax.axvline(
            chosen["threshold"],
            color="gray",
            ls="--",
            label=f"chosen {chosen['threshold']:.2f} ({chosen.get('objective', '')} {chosen['score']:.3f})",
        )
    ax.set_xlabel("threshold (probability >= threshold is vessel)")
    ax.set_ylabel("score")
    ax.set_xlim(float(t.min()), float(t.max()))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "Validation threshold sweep")
    fig.tight_layout()
    return fig
