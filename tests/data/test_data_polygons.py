"""Mask <-> polygon round trips under the pycocotools rasterisation convention."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sa2va_pipeline.data.polygons import dice, mask_to_polygons, rasterize_polygon, rasterize_polygons


def _round_trip(mask: np.ndarray) -> np.ndarray:
    polys = mask_to_polygons(mask)
    assert all(len(p) >= 8 and len(p) % 2 == 0 for p in polys)  # never a 4-number "bbox" polygon
    return rasterize_polygons(polys, *mask.shape)


def _ring(h=40, w=40, r0=6, r1=12):
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2 + 0.5, xx - w / 2 + 0.5)
    return ((r >= r0) & (r <= r1)).astype(np.uint8)


def _thin_line(h=30, w=30):
    m = np.zeros((h, w), np.uint8)
    m[5, 3:27] = 1  # horizontal 1 px
    m[3:27, 20] = 1  # vertical 1 px
    return m


def _diagonal(h=30, w=30):
    m = np.zeros((h, w), np.uint8)
    idx = np.arange(2, 28)
    m[idx, idx] = 1  # 8-connected 1-px diagonal
    m[idx[:-3], 29 - idx[:-3]] = 1  # the other diagonal, crossing it
    return m


def _figure8():
    m = np.zeros((50, 30), np.uint8)  # two loops sharing a waist, drawn 1 px wide
    cv2.circle(m, (15, 13), 10, 1, 1)
    cv2.circle(m, (15, 34), 11, 1, 1)
    return m


def _nested(h=60, w=60):
    m = _ring(h, w, 22, 28)  # outer ring
    m |= _ring(h, w, 8, 13)  # ring in its hole
    m[h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1] = 1  # island in the inner hole
    return m


def _multi(h=48, w=64):
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (10, 10), 6, 1, -1)
    cv2.line(m, (20, 40), (60, 5), 1, 1)
    cv2.line(m, (0, 47), (63, 30), 1, 3)
    m[0, 63] = 1  # single pixel in a corner
    m[47, 0] = 1
    return m


@pytest.mark.parametrize(
    "make", [_thin_line, _diagonal, _ring, _figure8, _nested, _multi], ids=lambda f: f.__name__.strip("_")
)
def test_round_trip_is_exact(make):
    mask = make()
    assert mask.any()
    back = _round_trip(mask)
    assert dice(mask, back) == 1.0
    np.testing.assert_array_equal(back, mask)


def test_holes_are_not_filled():
    mask = _ring()
    back = _round_trip(mask)
    assert back[20, 20] == 0 and mask[20, 20] == 0  # the hole stays open
    assert back.sum() == mask.sum()


def test_random_masks_are_exact():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        np.testing.assert_array_equal(_round_trip(mask), mask)


def test_polygons_are_disjoint():
    """Sa2VA may add per-polygon masks instead of taking the union: disjoint polygons make both equal."""
    mask = _nested()
    total = sum(rasterize_polygon(p, *mask.shape).astype(int) for p in mask_to_polygons(mask))
    assert total.max() == 1


def test_empty_mask_has_no_polygons():
    assert mask_to_polygons(np.zeros((8, 8), np.uint8)) == []
    assert rasterize_polygons([], 8, 8).sum() == 0


def test_convention_pixel_centres():
    """Pixel (c, r) has its centre at (c + 0.5, r + 0.5): a pixel is filled iff its centre is inside
    (checked on a triangle whose edges pass no centre closer than 0.2 px)."""
    h, w = 20, 24
    poly = [2.3, 1.7, 21.6, 6.2, 7.1, 18.4]
    filled = rasterize_polygon(poly, h, w)
    path = np.array(poly).reshape(-1, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = cv2.pointPolygonTest  # signed distance > 0 inside
    contour = path.astype(np.float32).reshape(-1, 1, 2)
    dist = np.array([inside(contour, (float(x), float(y)), True) for x, y in centres]).reshape(h, w)
    clear = np.abs(dist) > 0.25
    assert clear.sum() > 0.8 * h * w
    np.testing.assert_array_equal(filled[clear], (dist > 0)[clear].astype(np.uint8))
    # an axis-aligned square on pixel edges [2, 5] x [3, 7] covers columns 2..4 and rows 3..6
    sq = rasterize_polygon([2, 3, 5, 3, 5, 7, 2, 7], h, w)
    assert sq.sum() == 12 and sq[3:7, 2:5].all()


def test_matches_pycocotools_when_installed():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    for i in range(300):
        h, w = (int(v) for v in rng.integers(3, 50, 2))
        k = int(rng.integers(3, 10))
        poly = rng.random(2 * k) * np.tile([w * 1.3, h * 1.3], k) - np.tile([0.15 * w, 0.15 * h], k)
        if i % 3 == 0:
            poly = np.round(poly)
        ref = mask_utils.decode(mask_utils.frPyObjects([poly.tolist()], h, w))[:, :, 0]
        np.testing.assert_array_equal(rasterize_polygon(poly.tolist(), h, w), ref)
    mask = _nested()
    rles = mask_utils.frPyObjects(mask_to_polygons(mask), *mask.shape)
    np.testing.assert_array_equal(mask_utils.decode(mask_utils.merge(rles)), mask)
