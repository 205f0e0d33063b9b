"""Figures of a training run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def loss_curve_figure(history: list[dict[str, Any]], evaluations: list[dict[str, Any]]) -> Figure:
    """Loss components per optimiser step (left axis) and validation Dice at the best threshold (right)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = [row["step"] for row in history]
    for key, style in (("loss", "-"), ("loss_llm", ":"), ("loss_mask_bce", "--"), ("loss_mask_dice", "-.")):
        if history and key in history[0]:
            ax.plot(steps, [row[key] for row in history], style, label=key)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evaluations:
        ax2 = ax.twinx()
        ax2.plot(
            [e["step"] for e in evaluations],
            [e.get("val_dice_best_threshold", float("nan")) for e in evaluations],
            "o-", color="black", label="val Dice (best threshold)",
        )
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation Dice")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.set_title("Training loss and validation Dice")
    fig.tight_layout()
    return fig
