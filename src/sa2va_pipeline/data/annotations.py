"""Sa2VA ``annotations.json``: write it from binary masks, read and validate existing ones.

Format (one entry per image)::

    [{"image": "<file name inside the image folder>",
      "text": ["blood vessel"],                 # one phrase per object
      "mask": [[[x0, y0, x1, y1, ...], ...]]}]  # per object: its polygons, flat x,y in image pixels

Sa2VA fills every polygon with pycocotools and unions them per object; see
:mod:`sa2va_pipeline.data.polygons` for the convention we follow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sa2va_pipeline.data.image_io import read_mask01
from sa2va_pipeline.data.polygons import dice, mask_to_polygons, rasterize_polygons

MAX_ERRORS_SHOWN = 20


class AnnotationFormatError(ValueError):
    """Malformed ``annotations.json`` entries; ``errors`` lists one message per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{source}: {len(errors)} problem(s) in annotations:\n  {shown}{more}")


def mask_to_entry(image_name: str, mask: np.ndarray, phrase: str) -> dict[str, Any]:
    """One annotations.json entry for a single-object (binary) mask; an empty mask gives no polygons."""
    return {"image": image_name, "text": [phrase], "mask": [mask_to_polygons(mask)]}


def entry_to_masks(entry: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Rasterise every object of an entry as Sa2VA does: ``(n_objects, H, W)`` uint8 0/1."""
    objects = entry["mask"]
    out = np.zeros((len(objects), height, width), dtype=np.uint8)
    for i, polygons in enumerate(objects):
        out[i] = rasterize_polygons(polygons, height, width)
    return out


def round_trip_dice(mask: np.ndarray, entry: Mapping[str, Any]) -> float:
    """Dice between a binary mask and the union of all objects of its entry after rasterisation."""
    h, w = mask.shape
    return dice(mask, entry_to_masks(entry, h, w).max(axis=0, initial=0))


# ------------------------------------------------------------------------------------------ reader
def _is_number(v: Any) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool)


def _is_flat_numbers(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_number(c) for c in v)


def _is_point_pairs(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(c) for c in p) for p in v
    )


def _normalise_polygon(poly: Any) -> Any:
    """[[x, y], ...] pairs -> flat list; anything else as it is (checked later)."""
    if _is_point_pairs(poly):
        return [float(c) for p in poly for c in p]
    return poly


def _normalise_objects(mask: Any) -> list[list[Any]]:
    """Accept the nesting variants seen in the wild and return objects -> polygons -> coordinates.

    * ``[[poly, ...], ...]`` (the Sa2VA format);
    * ``[poly, ...]`` (one object, a nesting level missing);
    * ``poly`` (a single flat polygon for a single object);
    * polygons written as ``[[x, y], ...]`` point pairs.
    """
    if _is_flat_numbers(mask):
        return [[mask]]
    if _is_point_pairs(mask):
        return [[_normalise_polygon(mask)]]
    if not isinstance(mask, list):
        return mask  # reported as malformed by the caller
    if mask and all(_is_flat_numbers(p) or _is_point_pairs(p) for p in mask):
        # a list of polygons: one object, unless each "polygon" is itself a list of point pairs
        # of an object (ambiguous only for point-pair lists, which we take as polygons)
        return [[_normalise_polygon(p) for p in mask]]
    return [
        [_normalise_polygon(p) for p in obj] if isinstance(obj, list) else obj
        for obj in mask
    ]


def parse_annotations(
    data: Any,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    source: str = "annotations.json",
) -> list[dict[str, Any]]:
    """Validate and normalise parsed annotations.json content.

    Args:
        data: the parsed JSON (a list of entries).
        image_sizes: optional ``{image: (height, width)}``; when an entry's image is in it, every point
            must lie inside the image (``0 <= x <= width``, ``0 <= y <= height``: pixel edges).
        source: name used in error messages.

    Returns:
        Entries with ``text`` a list of strings and ``mask`` objects -> polygons -> flat float lists.

    Raises:
        AnnotationFormatError: one message per malformed entry/polygon, each naming the entry index and
            image: odd coordinate count, fewer than 3 points, non-numeric or non-finite coordinates,
            points outside the image, ``len(text) != len(mask)``, missing keys.
    """
    if not isinstance(data, list):
        raise AnnotationFormatError(source, [f"top level must be a list of entries, got {type(data).__name__}"])
    errors: list[str] = []
    entries: list[dict[str, Any]] = []
    for i, raw in enumerate(data):
        image = raw.get("image") if isinstance(raw, Mapping) else None
        where = f"entry {i} (image {image!r})"
        if not isinstance(raw, Mapping):
            errors.append(f"entry {i}: must be an object with image/text/mask, got {type(raw).__name__}")
            continue
        missing = [k for k in ("image", "text", "mask") if k not in raw]
        if missing:
            errors.append(f"{where}: missing key(s) {missing}")
            continue
        if not isinstance(image, str) or not image:
            errors.append(f"{where}: 'image' must be a non-empty string")
            continue
        text = raw["text"]
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            errors.append(f"{where}: 'text' must be a string or a list of strings")
            continue
        objects = _normalise_objects(raw["mask"])
        if not isinstance(objects, list) or not all(isinstance(o, list) for o in objects):
            errors.append(f"{where}: 'mask' must be a list of objects, each a list of polygons")
            continue
        if len(text) != len(objects):
            errors.append(f"{where}: {len(text)} text phrase(s) but {len(objects)} mask object(s)")
            continue
        size = image_sizes.get(image) if image_sizes else None
        clean_objects: list[list[list[float]]] = []
        entry_ok = True
        for j, polygons in enumerate(objects):
            clean_polys = []
            for k, poly in enumerate(polygons):
                pwhere = f"{where}, object {j}, polygon {k}"
                if not isinstance(poly, list) or not all(_is_number(c) for c in poly):
                    errors.append(f"{pwhere}: coordinates must be a flat list of numbers")
                    entry_ok = False
                    continue
                if len(poly) % 2:
                    errors.append(f"{pwhere}: odd number of coordinates ({len(poly)})")
                    entry_ok = False
                    continue
                if len(poly) < 6:
                    errors.append(f"{pwhere}: {len(poly) // 2} point(s); a polygon needs at least 3")
                    entry_ok = False
                    continue
                coords = [float(c) for c in poly]
                if not all(math.isfinite(c) for c in coords):
                    errors.append(f"{pwhere}: non-finite coordinate")
                    entry_ok = False
                    continue
                if size is not None:
                    h, w = size
                    xs, ys = coords[0::2], coords[1::2]
                    if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
                        errors.append(
                            f"{pwhere}: point(s) outside the {w}x{h} image "
                            f"(x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, {max(ys):g}])"
                        )
                        entry_ok = False
                        continue
                clean_polys.append(coords)
            clean_objects.append(clean_polys)
        if entry_ok:
            entries.append({"image": image, "text": list(text), "mask": clean_objects})
    if errors:
        raise AnnotationFormatError(source, errors)
    return entries


def read_annotations(
    path: str | Path, image_sizes: Mapping[str, tuple[int, int]] | None = None
) -> list[dict[str, Any]]:
    """Read and validate an ``annotations.json`` file (see :func:`parse_annotations`).

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationFormatError: not valid JSON, or malformed entries (each error names index and image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationFormatError(str(path), [f"not valid JSON: {exc}"]) from exc
    return parse_annotations(data, image_sizes, source=str(path))


def polygon_stats(entry: Mapping[str, Any]) -> tuple[int, int]:
    """(number of polygons, number of points) over all objects of an entry."""
    polys: Sequence[Sequence[float]] = [p for obj in entry["mask"] for p in obj]
    return len(polys), sum(len(p) // 2 for p in polys)


# ------------------------------------------------------------------------- manifest -> annotations
REPORT_COLUMNS = ["id", "image", "source", "n_polygons", "n_points", "vessel_pixels", "dice", "below_floor"]


def annotate_manifest(
    manifest: pd.DataFrame,
    phrase: str,
    dice_floor: float,
    user_entries: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Build annotations.json entries for every manifest row, with a per-sample round-trip report.

    Each entry's ``image`` is the file name of the ingested image (the image folder is the ingested
    ``images/`` folder). Masks are read one at a time. With ``user_entries`` (already validated, see
    :func:`read_annotations`), a user entry replaces the generated one when its image matches a sample
    by file name or stem; the report then measures how well it reproduces the ingested mask.
    User entries that match no sample are reported (``source`` = ``user_unmatched``), never dropped
    silently; samples the user file lacks get generated entries.

    Returns:
        ``(entries, report)``; report columns: id, image, source, n_polygons, n_points, vessel_pixels,
        dice, below_floor.
    """
    by_key: dict[str, Mapping[str, Any]] = {}
    for entry in user_entries or []:
        by_key.setdefault(Path(entry["image"]).name, entry)
        by_key.setdefault(Path(entry["image"]).stem, entry)
    used: set[int] = set()
    entries, rows = [], []
    for row in manifest.itertuples(index=False):
        image_name = Path(row.image).name
        mask = read_mask01(row.mask)
        user = by_key.get(image_name) or by_key.get(str(row.id))
        if user is not None:
            used.add(id(user))
            entry = {"image": image_name, "text": list(user["text"]), "mask": user["mask"]}
            source = "user"
        else:
            entry = mask_to_entry(image_name, mask, phrase)
            source = "generated"
        score = round_trip_dice(mask, entry)
        n_polys, n_points = polygon_stats(entry)
        entries.append(entry)
        rows.append({
            "id": row.id, "image": image_name, "source": source, "n_polygons": n_polys, "n_points": n_points,
            "vessel_pixels": int(mask.sum()), "dice": round(score, 6), "below_floor": bool(score < dice_floor),
        })
    for entry in user_entries or []:
        if id(entry) not in used:
            rows.append({
                "id": "", "image": entry["image"], "source": "user_unmatched", "n_polygons": polygon_stats(entry)[0],
                "n_points": polygon_stats(entry)[1], "vessel_pixels": 0, "dice": float("nan"), "below_floor": False,
            })
    return entries, pd.DataFrame(rows, columns=REPORT_COLUMNS)
