"""The threshold-sweep plot: Dice, precision and recall against threshold per phrase, the choice marked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd


def draw_sweep(
    ax: Any, sweep: pd.DataFrame, chosen: Mapping[str, Any] | None = None, title: str = ""
) -> None:
    """Draw one sweep table (see :func:`~.threshold_sweep.sweep_thresholds`) on a matplotlib axis.

    Pooled Dice, mean per-image Dice (with a +-1 SD band), pooled precision and pooled recall; a dashed
    vertical line marks ``chosen["threshold"]`` when given. Precision is left out where nothing is predicted
    (its 0 there is a convention, not a measurement).
    """
    t = sweep["threshold"]
    ax.plot(t, sweep["dice_pooled"], color="black", lw=2, label="Dice (pooled)")
    ax.plot(t, sweep["dice_mean"], color="#CC79A7", lw=1.5, label="Dice (mean per image)")
    ax.fill_between(t, sweep["dice_mean"] - sweep["dice_sd"], sweep["dice_mean"] + sweep["dice_sd"],
                    color="#CC79A7", alpha=0.15, label="mean Dice +- 1 SD")
    predicted = (sweep["tp"] + sweep["fp"]) > 0
    precision = sweep["precision_pooled"].where(predicted)
    ax.plot(t, precision, color="#D55E00", lw=1.5, label="precision (pooled)")
    ax.plot(t, sweep["recall_pooled"], color="#0072B2", lw=1.5, label="recall (pooled)")
    if chosen is not None:
        label = f"chosen {chosen['threshold']:.2f} ({chosen.get('objective', '')} {chosen['score']:.3f})"
        ax.axvline(chosen["threshold"], color="gray", ls="--", label=label)
    ax.set_xlabel("threshold (probability >= threshold is foreground)")
    ax.set_ylabel("score")
    ax.set_xlim(float(t.min()), float(t.max()))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "Validation threshold sweep")


def threshold_sweep_figure(sweep: pd.DataFrame, chosen: dict[str, Any] | None = None, title: str = "") -> Any:
    """A matplotlib figure of one sweep table (one phrase), the chosen threshold marked."""
    return threshold_sweeps_figure({"": sweep}, {"": chosen} if chosen else {}, title)


def threshold_sweeps_figure(
    sweeps: Mapping[str, pd.DataFrame], chosen: Mapping[str, Mapping[str, Any]], title: str = ""
) -> Any:
    """One panel per phrase (``{phrase: sweep}``), each with its chosen threshold (``{phrase: record}``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.2 * len(sweeps) + 0.4), dpi=110, layout="constrained")
    axes = fig.subplots(len(sweeps), 1, squeeze=False)[:, 0]
    for ax, (phrase, sweep) in zip(axes, sweeps.items()):
        heading = f"{title or 'Validation threshold sweep'}: {phrase}" if phrase else title
        draw_sweep(ax, sweep, chosen.get(phrase), heading)
    return fig
