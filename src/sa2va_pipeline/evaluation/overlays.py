"""Overlays of a prediction on its frame: true positives, false positives and false negatives in colour.

Default colours (configurable in ``conf/base/parameters_evaluation.yml``, ``evaluation.overlay``):
true positive green (0, 200, 0), false positive red (230, 0, 0), false negative blue (0, 110, 255);
true negatives show the frame. Without ground truth (inference) the predicted mask is drawn in the
true-positive colour and labelled "predicted vessel". Every overlay PNG carries a legend strip below
the frame naming the colours; the grid figure has a matplotlib legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "true_positive": (0, 200, 0),
    "false_positive": (230, 0, 0),
    "false_negative": (0, 110, 255),
}
LEGEND_LABELS: dict[str, str] = {
    "true_positive": "true positive",
    "false_positive": "false positive",
    "false_negative": "false negative (missed)",
}
COLOR_NAMES: dict[tuple[int, int, int], str] = {
    (0, 200, 0): "green",
    (230, 0, 0): "red",
    (0, 110, 255): "blue",
}


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def error_overlay(
    image: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
    alpha: float = 0.7,
) -> np.ndarray:
    """Colour TP, FP and FN pixels over the frame (HxWx3 uint8 out, same size as the frame).

    With ``alpha`` 1 the coloured pixels carry exactly the configured colours; below 1 they are
    blended with the frame. ``truth`` None draws the prediction alone in the true-positive colour.
    """
    colors = {**DEFAULT_COLORS, **(colors or {})}
    out = _rgb(image).astype(np.float32)
    p = np.asarray(pred).astype(bool)
    if p.shape != out.shape[:2]:
        raise ValueError(f"mask shape {p.shape} does not match image shape {out.shape[:2]}")
    if truth is None:
        layers = {"true_positive": p}
    else:
        t = np.asarray(truth).astype(bool)
        if t.shape != p.shape:
            raise ValueError(f"ground-truth shape {t.shape} does not match prediction shape {p.shape}")
        layers = {"true_positive": p & t, "false_positive": p & ~t, "false_negative": ~p & t}
    for name, where in layers.items():
        color = np.asarray(colors[name], dtype=np.float32)
        out[where] = (1.0 - alpha) * out[where] + alpha * color
    return np.rint(out).astype(np.uint8)


def legend_entries(
    colors: Mapping[str, Sequence[int]] | None = None, with_truth: bool = True
) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) pairs for a legend, naming the colour where it is one of the defaults."""
    colors = {**DEFAULT_COLORS, **(colors or {})}
    names = ("true_positive", "false_positive", "false_negative") if with_truth else ("true_positive",)
    entries = []
    for name in names:
        rgb = tuple(int(c) for c in colors[name])
        label = LEGEND_LABELS[name] if with_truth else "predicted vessel"
        if rgb in COLOR_NAMES:
            label = f"{COLOR_NAMES[rgb]}: {label}"
        entries.append((label, rgb))
    return entries


def add_legend_strip(
    overlay: np.ndarray, colors: Mapping[str, Sequence[int]] | None = None, with_truth: bool = True
) -> np.ndarray:
    """Append a white strip under the overlay with a coloured square and a label per class.

    The frame itself keeps its position (rows ``0..H-1``), so pixel checks on the frame still hold.
    """
    from PIL import Image, ImageDraw

    entries = legend_entries(colors, with_truth)
    width = overlay.shape[1]
    row_h = 14
    strip = Image.new("RGB", (width, row_h * len(entries) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (label, rgb) in enumerate(entries):
        y = 3 + i * row_h
        draw.rectangle([4, y + 1, 14, y + 11], fill=rgb, outline=(0, 0, 0))
        draw.text((20, y), label, fill=(0, 0, 0))
    return np.concatenate([overlay, np.asarray(strip)], axis=0)


def overlay_grid_figure(
    panels: Sequence[dict[str, Any]],
    colors: Mapping[str, Sequence[int]] | None = None,
    with_truth: bool = True,
    title: str = "",
    columns: int = 3,
) -> Any:
    """A matplotlib figure of overlays side by side, with a legend naming the colours.

    Args:
        panels: dicts with ``overlay`` (HxWx3 uint8, without legend strip) and ``title``.
        colors: the colours used for the overlays (for the legend).
        with_truth: False for inference overlays (prediction only).
        title: figure title.
        columns: panels per row.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = max(1, min(columns, len(panels))) if panels else 1
    rows = max(1, int(np.ceil(len(panels) / columns)))
    fig = Figure(figsize=(4.2 * columns, 4.4 * rows + 0.6), dpi=100)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel in zip(axes.ravel(), panels):
        ax.imshow(panel["overlay"])
        ax.set_title(panel.get("title", ""), fontsize=9)
    handles = [
        Patch(facecolor=np.asarray(rgb) / 255.0, edgecolor="black", label=label)
        for label, rgb in legend_entries(colors, with_truth)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def pick_best_median_worst(scores: Mapping[str, float]) -> dict[str, str]:
    """Ids of the best, median and worst image by score (NaN scores count as worst; ties by id)."""
    if not scores:
        raise ValueError("no images to pick from")
    ranked = sorted(scores, key=lambda i: (-np.nan_to_num(scores[i], nan=-np.inf), i))
    return {"best": ranked[0], "median": ranked[(len(ranked) - 1) // 2], "worst": ranked[-1]}
