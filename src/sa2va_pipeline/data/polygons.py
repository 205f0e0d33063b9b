"""Binary mask <-> polygons, with a rasteriser that follows pycocotools' polygon convention.

Sa2VA's dataset code turns every polygon of an object into a mask with pycocotools
(``frPyObjects`` -> ``decode``) and adds/unions the per-polygon masks. A union of filled polygons cannot
represent a hole directly, and a naive contour of a 1-px-wide branch fills nothing. We therefore encode
a mask as *disjoint run chains*:

* every row of the mask is cut into horizontal runs of foreground pixels;
* runs in consecutive rows are linked into chains (one run per row, top to bottom); a chain becomes one
  simple, y-monotone "staircase" polygon;
* because every foreground pixel belongs to exactly one chain, the polygons never overlap, so both
  "union" and "sum" of the per-polygon masks give the original mask, holes (vessel loops) included.

Pixel convention (pycocotools ``rleFrPoly``, reproduced by :func:`rasterize_polygon`): pixel ``(col, row)``
covers the square ``[col, col+1] x [row, row+1]``; its centre is ``(col + 0.5, row + 0.5)``. Vertices are
snapped to a 1/5-pixel grid (``int(5 * v + 0.5)``), the boundary is walked on that grid, and column ``c``
is toggled where the boundary crosses ``x = c + 0.5``, starting at row ``ceil((5y' + 0.5) / 5 - 0.5)``.
Our polygons place every vertex on that 1/5 grid (offsets 0.2 / 0.8 inside the pixel) and keep every
edge between rows inside the band ``(r + 0.8, r + 1.2)``, so rasterising them is exact, not approximate.

Difference from pycocotools: a degenerate edge (two equal consecutive vertices) divides 0 by 0 in the C
code (undefined behaviour that happens to be harmless there); we treat its slope as 0. The result is the
same for every polygon we have tried; our tests compare with pycocotools when it is installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# pycocotools rasterises on a grid 5x finer than the pixel grid.
_SCALE = 5
# Offsets of our vertices inside a pixel, on that 1/5 grid: left/top edge 0.2, right/bottom edge 0.8.
_NEAR = 0.2
_FAR = 0.8

Polygon = list[float]  # flat [x0, y0, x1, y1, ...] in image pixels


# --------------------------------------------------------------------------------------- rasteriser
def _boundary_points(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk the closed polygon on the 5x grid the way pycocotools does; returns fine-grid (u, v)."""
    x = np.trunc(_SCALE * xy[:, 0] + 0.5).astype(np.int64)
    y = np.trunc(_SCALE * xy[:, 1] + 0.5).astype(np.int64)
    xs, ys = x, y
    xe, ye = np.roll(x, -1), np.roll(y, -1)
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy
    n = np.where(along_x, dx, dy) + 1  # points per edge, both ends included
    # pycocotools swaps the ends of an edge that runs "backwards" and walks t back from the far end,
    # so the points come out in polygon order but the rounding is done from the swapped start.
    flip = (along_x & (xs > xe)) | (~along_x & (ys > ye))
    sx = np.where(flip, xe, xs)
    sy = np.where(flip, ye, ys)
    ex = np.where(flip, xs, xe)
    ey = np.where(flip, ys, ye)
    span = np.where(along_x, dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(along_x, (ey - sy) / span, (ex - sx) / span)
    slope = np.where(span == 0, 0.0, slope)  # degenerate edge: see the module docstring

    edge = np.repeat(np.arange(len(xs)), n)
    starts = np.cumsum(n) - n
    d = np.arange(int(n.sum())) - np.repeat(starts, n)
    t = np.where(flip[edge], span[edge] - d, d)
    ax = along_x[edge]
    rounded = np.trunc(np.where(ax, sy[edge], sx[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u = np.where(ax, t + sx[edge], rounded)
    v = np.where(ax, rounded, t + sy[edge])
    return u, v


def _toggle_positions(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Column-major positions (``col * height + row``) where the filled polygon toggles on or off."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    u, v = _boundary_points(xy)
    if len(u) < 2:
        return np.zeros(0, dtype=np.int64)
    moved = u[1:] != u[:-1]
    u0, u1, v0, v1 = u[:-1][moved], u[1:][moved], v[:-1][moved], v[1:][moved]
    # the crossed fine column: the smaller of the two u's (pycocotools: u[j] if moving left, else u[j]-1)
    xd = np.where(u1 < u0, u1, u1 - 1).astype(np.float64)
    xd = (xd + 0.5) / _SCALE - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = (np.minimum(v0, v1).astype(np.float64) + 0.5) / _SCALE - 0.5
    yd = np.ceil(np.clip(yd, 0, height))
    return (xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64)).astype(np.int64)


def rasterize_polygon(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Fill one polygon (flat x, y list in pixels) into an ``(height, width)`` uint8 0/1 mask.

    Same result as ``pycocotools.mask.decode(frPyObjects([polygon], height, width))`` (see module
    docstring for the convention).
    """
    return rasterize_polygons([polygon], height, width)


def rasterize_polygons(polygons: Iterable[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of filled polygons (what Sa2VA's loader builds for one object), uint8 0/1 ``(H, W)``.

    Each polygon's toggle points, sorted in column-major order, delimit its filled intervals exactly
    like the run-length encoding pycocotools builds (an odd count fills to the end of the image).
    """
    total = height * width
    coverage = np.zeros(total + 1, dtype=np.int32)
    for polygon in polygons:
        pos = np.sort(_toggle_positions(polygon, height, width))
        if len(pos) % 2:
            pos = np.append(pos, total)
        np.add.at(coverage, pos[0::2], 1)
        np.add.at(coverage, pos[1::2], -1)
    filled = (np.cumsum(coverage[:-1]) > 0).astype(np.uint8)
    return np.ascontiguousarray(filled.reshape(width, height).T)


# ------------------------------------------------------------------------------------------ encoder
def _row_runs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row, the inclusive ``(first_col, last_col)`` of each horizontal run of foreground pixels."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask != 0
    diff = np.diff(padded, axis=1)
    rows_s, cols_s = np.nonzero(diff == 1)
    _, cols_e = np.nonzero(diff == -1)
    runs: list[list[tuple[int, int]]] = [[] for _ in range(mask.shape[0])]
    for r, a, b in zip(rows_s.tolist(), cols_s.tolist(), (cols_e - 1).tolist()):
        runs[r].append((a, b))
    return runs


def _chains(runs: list[list[tuple[int, int]]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """Link runs of consecutive rows into chains ``(first_row, [run per row])``.

    A run continues the leftmost chain of the previous row that touches it (8-connectivity) and has
    not been continued yet; any other run starts a new chain. Correctness does not depend on this
    choice (any chain of consecutive rows rasterises exactly); it only keeps polygons few and local.
    """
    finished: list[tuple[int, list[tuple[int, int]]]] = []
    open_chains: list[tuple[int, list[tuple[int, int]]]] = []
    for r, row in enumerate(runs):
        still_open: list[tuple[int, list[tuple[int, int]]]] = []
        taken = [False] * len(open_chains)
        for a, b in row:
            for i, (_, chain) in enumerate(open_chains):
                pa, pb = chain[-1]
                if not taken[i] and a <= pb + 1 and b >= pa - 1:
                    taken[i] = True
                    chain.append((a, b))
                    still_open.append(open_chains[i])
                    break
            else:
                still_open.append((r, [(a, b)]))
        finished.extend(c for c, t in zip(open_chains, taken) if not t)
        open_chains = still_open
    finished.extend(open_chains)
    return finished


def _drop_collinear(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Remove vertices in the middle of a straight horizontal or vertical stretch (exactly collinear)."""
    out: list[tuple[float, float]] = []
    n = len(points)
    for i, (x, y) in enumerate(points):
        px, py = points[i - 1]
        nx, ny = points[(i + 1) % n]
        if (px == x == nx) or (py == y == ny):
            continue
        out.append((x, y))
    return out


def _chain_polygon(first_row: int, chain: list[tuple[int, int]]) -> Polygon:
    """The staircase polygon of one chain: down the left ends, back up the right ends."""
    left: list[tuple[float, float]] = []
    right: list[tuple[float, float]] = []
    for i, (a, b) in enumerate(chain):
        r = first_row + i
        left += [(a + _NEAR, r + _NEAR), (a + _NEAR, r + _FAR)]
        right += [(b + _FAR, r + _NEAR), (b + _FAR, r + _FAR)]
    points = _drop_collinear(left + right[::-1])
    return [round(c, 1) for p in points for c in p]


def mask_to_polygons(mask: np.ndarray) -> list[Polygon]:
    """Encode a binary mask as polygons whose filled union reproduces it exactly.

    Args:
        mask: ``(H, W)`` array; non-zero is foreground.

    Returns:
        Disjoint polygons, each a flat ``[x0, y0, x1, y1, ...]`` list in image pixels (1 decimal).
        An empty mask gives an empty list.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons expects a 2-D mask, got shape {mask.shape}")
    return [_chain_polygon(r0, chain) for r0, chain in _chains(_row_runs(mask))]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    a, b = a != 0, b != 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
