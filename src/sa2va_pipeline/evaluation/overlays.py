"""Overlays of predictions on their frames, in a colour-blind-safe palette (Okabe & Ito), with legends.

With ground truth (evaluation), one phrase per overlay: true positive bluish green (0, 158, 115), false
positive vermillion (213, 94, 0), false negative sky blue (86, 180, 233); true negatives show the frame.
Without ground truth (inference), every phrase's predicted mask is drawn in its own colour, taken in order
from the same palette (:data:`PHRASE_PALETTE`), so several structures share one overlay. Colours are
configurable (``overlay`` in ``conf/base/parameters.yml``). Every overlay PNG carries a legend strip below the
frame; ``with_raw`` puts the untouched frame beside the overlay. Grid figures have a matplotlib legend, titles
that do not overlap the images (constrained layout) and no blank cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Okabe & Ito (2008), "Color Universal Design": distinguishable with the common colour-vision deficiencies.
OKABE_ITO: dict[str, tuple[int, int, int]] = {
    "bluish green": (0, 158, 115),
    "vermillion": (213, 94, 0),
    "sky blue": (86, 180, 233),
    "orange": (230, 159, 0),
    "reddish purple": (204, 121, 167),
    "yellow": (240, 228, 66),
    "blue": (0, 114, 178),
}
DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "true_positive": OKABE_ITO["bluish green"],
    "false_positive": OKABE_ITO["vermillion"],
    "false_negative": OKABE_ITO["sky blue"],
}
# Colours of phrases on prediction-only overlays, in phrase order (repeats after seven phrases).
PHRASE_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    OKABE_ITO[name]
    for name in ("bluish green", "orange", "sky blue", "reddish purple", "yellow", "vermillion", "blue")
)
LEGEND_LABELS: dict[str, str] = {
    "true_positive": "true positive",
    "false_positive": "false positive",
    "false_negative": "false negative (missed)",
}
COLOR_NAMES: dict[tuple[int, int, int], str] = {rgb: name for name, rgb in OKABE_ITO.items()}


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


def _paint(image: np.ndarray, layers: Sequence[tuple[np.ndarray, Sequence[int]]], alpha: float) -> np.ndarray:
    """Blend each (mask, colour) layer over the frame, in order (later layers on top)."""
    out = _rgb(image).astype(np.float32)
    for where, color in layers:
        where = np.asarray(where).astype(bool)
        if where.shape != out.shape[:2]:
            raise ValueError(f"mask shape {where.shape} does not match image shape {out.shape[:2]}")
        out[where] = (1.0 - alpha) * out[where] + alpha * np.asarray(color, dtype=np.float32)
    return np.rint(out).astype(np.uint8)


def error_overlay(
    image: np.ndarray,
    pred: np.ndarray,
    truth: np.ndarray | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
    alpha: float = 0.7,
) -> np.ndarray:
    """Colour TP, FP and FN pixels of one phrase over the frame (HxWx3 uint8 out, same size as the frame).

    With ``alpha`` 1 the coloured pixels carry exactly the configured colours; below 1 they are
    blended with the frame. ``truth`` None draws the prediction alone in the true-positive colour.
    """
    colors = {**DEFAULT_COLORS, **(colors or {})}
    p = np.asarray(pred).astype(bool)
    if truth is None:
        return _paint(image, [(p, colors["true_positive"])], alpha)
    t = np.asarray(truth).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"ground-truth shape {t.shape} does not match prediction shape {p.shape}")
    layers = [
        (p & t, colors["true_positive"]),
        (p & ~t, colors["false_positive"]),
        (~p & t, colors["false_negative"]),
    ]
    return _paint(image, layers, alpha)


def phrase_colors(
    phrases: Sequence[str], palette: Sequence[Sequence[int]] | None = None
) -> dict[str, tuple[int, int, int]]:
    """One colour per phrase, in order, from ``palette`` (default :data:`PHRASE_PALETTE`)."""
    palette = [tuple(int(c) for c in rgb) for rgb in (palette or PHRASE_PALETTE)]
    return {phrase: palette[i % len(palette)] for i, phrase in enumerate(phrases)}


def phrase_overlay(
    image: np.ndarray,
    masks: Mapping[str, np.ndarray],
    colors: Mapping[str, Sequence[int]],
    alpha: float = 0.7,
) -> np.ndarray:
    """Every phrase's predicted mask over the frame in its colour (later phrases drawn on top)."""
    return _paint(image, [(masks[p], colors[p]) for p in masks], alpha)


def _named(label: str, rgb: tuple[int, int, int]) -> str:
    return f"{COLOR_NAMES[rgb]}: {label}" if rgb in COLOR_NAMES else label


def legend_entries(
    colors: Mapping[str, Sequence[int]] | None = None, with_truth: bool = True
) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) pairs of the TP/FP/FN legend, naming the colour where it is one of the palette's."""
    colors = {**DEFAULT_COLORS, **(colors or {})}
    names = ("true_positive", "false_positive", "false_negative") if with_truth else ("true_positive",)
    entries = []
    for name in names:
        rgb = tuple(int(c) for c in colors[name])
        entries.append((_named(LEGEND_LABELS[name] if with_truth else "predicted", rgb), rgb))
    return entries


def phrase_legend_entries(colors: Mapping[str, Sequence[int]]) -> list[tuple[str, tuple[int, int, int]]]:
    """(label, colour) pairs naming each phrase's colour on a prediction-only overlay."""
    rgbs = {phrase: tuple(int(c) for c in rgb) for phrase, rgb in colors.items()}
    return [(_named(phrase, rgb), rgb) for phrase, rgb in rgbs.items()]


def add_legend_strip(
    overlay: np.ndarray,
    colors: Mapping[str, Sequence[int]] | None = None,
    with_truth: bool = True,
    entries: Sequence[tuple[str, tuple[int, int, int]]] | None = None,
) -> np.ndarray:
    """Append a white strip under the overlay with a coloured square and a label per entry.

    ``entries`` defaults to the TP/FP/FN legend (:func:`legend_entries`). The frame itself keeps its position
    (rows ``0..H-1``), so pixel checks on the frame still hold.
    """
    from PIL import Image, ImageDraw

    entries = list(entries) if entries is not None else legend_entries(colors, with_truth)
    width = overlay.shape[1]
    row_h = 14
    strip = Image.new("RGB", (width, row_h * len(entries) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (label, rgb) in enumerate(entries):
        y = 3 + i * row_h
        draw.rectangle([4, y + 1, 14, y + 11], fill=rgb, outline=(0, 0, 0))
        draw.text((20, y), label, fill=(0, 0, 0))
    return np.concatenate([overlay, np.asarray(strip)], axis=0)


def beside_raw(image: np.ndarray, overlay: np.ndarray, gap: int = 4) -> np.ndarray:
    """The untouched frame, a white gap, then the overlay: one HxW'x3 image."""
    raw = _rgb(image)
    spacer = np.full((raw.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([raw, spacer, overlay], axis=1)


def grid_shape(n_panels: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) for ``n_panels`` with at most ``max_columns`` per row and no blank cell.

    The column count is the largest divisor of ``n_panels`` not above ``max_columns``; trim the panel count
    first with :func:`grid_panels` when it should fill rows of exactly ``max_columns``.
    """
    if n_panels <= 0:
        return 1, 1
    columns = max(c for c in range(1, min(max_columns, n_panels) + 1) if n_panels % c == 0)
    return n_panels // columns, columns


def grid_panels(n_available: int, max_panels: int, max_columns: int) -> int:
    """How many panels to show so that full rows of up to ``max_columns`` hold them (no blank cell)."""
    n = min(n_available, max_panels)
    if n <= max_columns:
        return n
    return (n // max_columns) * max_columns


def overlay_grid_figure(
    panels: Sequence[dict[str, Any]],
    colors: Mapping[str, Sequence[int]] | None = None,
    with_truth: bool = True,
    title: str = "",
    columns: int = 3,
    entries: Sequence[tuple[str, tuple[int, int, int]]] | None = None,
) -> Any:
    """A matplotlib figure of panels in full rows, with a legend naming the colours.

    Args:
        panels: dicts with ``overlay`` (HxWx3 uint8, without legend strip; may include the raw frame beside
            it) and ``title`` (may span two lines).
        colors: the TP/FP/FN colours used (for the default legend).
        with_truth: False for prediction-only overlays.
        title: figure title.
        columns: the most panels per row; fewer when that avoids blank cells (:func:`grid_shape`).
        entries: legend entries instead of the TP/FP/FN ones (e.g. :func:`phrase_legend_entries`).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows, columns = grid_shape(len(panels), columns)
    aspect = max((p["overlay"].shape[1] / p["overlay"].shape[0] for p in panels), default=1.0)
    fig = Figure(figsize=(3.6 * aspect * columns, 3.6 * rows + 1.2), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, panel in zip(axes.ravel(), panels):
        ax.imshow(panel["overlay"])
        ax.set_title(panel.get("title", ""), fontsize=9)
    entries = list(entries) if entries is not None else legend_entries(colors, with_truth)
    handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="black", label=text) for text, c in entries]
    ncol = min(len(handles), 4)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def pick_best_median_worst(scores: Mapping[str, float]) -> dict[str, str]:
    """Ids of the best, median and worst image by score (NaN scores count as worst; ties by id)."""
    if not scores:
        raise ValueError("no images to pick from")
    ranked = sorted(scores, key=lambda i: (-np.nan_to_num(scores[i], nan=-np.inf), i))
    return {"best": ranked[0], "median": ranked[(len(ranked) - 1) // 2], "worst": ranked[-1]}
