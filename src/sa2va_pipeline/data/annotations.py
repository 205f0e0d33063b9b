"""Sa2VA ``annotations.json``: read and validate a user's file (a label source of its own), and build
the ONE annotations.json of the ingested data from each image's objects, with a per-object report.

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
from sa2va_pipeline.data.sources import DetectedSource, ImageFile, ImageListing, Labels, PlannedObject
from sa2va_pipeline.errors import UserError

MAX_ERRORS_SHOWN = 20


class AnnotationFormatError(UserError, ValueError):
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


def polygon_problem(poly: Any, size: tuple[int, int] | None = None) -> str | None:
    """What is wrong with one flat polygon (``size`` = (height, width) bounds the points), or None."""
    if not isinstance(poly, list) or not all(_is_number(c) for c in poly):
        return "coordinates must be a flat list of numbers"
    if len(poly) % 2:
        return f"odd number of coordinates ({len(poly)})"
    if len(poly) < 6:
        return f"{len(poly) // 2} point(s); a polygon needs at least 3"
    coords = [float(c) for c in poly]
    if not all(math.isfinite(c) for c in coords):
        return "non-finite coordinate"
    if size is not None:
        h, w = size
        xs, ys = coords[0::2], coords[1::2]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
            return (f"point(s) outside the {w}x{h} image "
                    f"(x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, {max(ys):g}])")
    return None


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
        if not all(t.strip() for t in text):
            errors.append(f"{where}: 'text' holds an empty phrase; every object needs its phrase")
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
                problem = polygon_problem(poly, size)
                if problem:
                    errors.append(f"{where}, object {j}, polygon {k}: {problem}")
                    entry_ok = False
                    continue
                clean_polys.append([float(c) for c in poly])
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


# ------------------------------------------------------------------------ annotations.json as a source
def _match_entries(data: Any, listing: ImageListing) -> tuple[dict[int, ImageFile], dict[str, tuple[int, int]]]:
    """Entry index -> ingested image (by file name, else by stem), and the sizes to check points against."""
    by_name, by_stem = listing.by_name(), listing.by_stem()
    matches: dict[int, ImageFile] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for i, raw in enumerate(data if isinstance(data, list) else []):
        image = raw.get("image") if isinstance(raw, Mapping) else None
        if isinstance(image, str) and image:
            found = by_name.get(Path(image).name) or by_stem.get(Path(image).stem)
            if found is not None:
                matches[i] = found
                sizes[image] = (found.height, found.width)
    return matches, sizes


def read_sa2va_labels(root: Path, source: DetectedSource, listing: ImageListing, config: Any = None) -> Labels:
    """Objects of every image from a Sa2VA ``annotations.json`` (polygons kept verbatim), with report rows.

    Entries are matched to ``images/`` by file name, else by stem; only names are compared, so an entry
    can never make us read a file outside ``images/``. An entry whose image is absent is a rejected row
    ``<file>#entry <i>``; an image no entry names is rejected (add an entry with empty ``text``/``mask``
    for an image without objects).

    Raises:
        AnnotationFormatError: malformed entries, points outside their image, two entries for one image
            (every problem listed, each naming the entry index and image).
    """
    path = source.evidence[0]
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    matches, sizes = _match_entries(source.data, listing)
    entries = parse_annotations(source.data, sizes, source=str(path))
    seen: dict[str, int] = {}
    errors = []
    for i, image in sorted(matches.items()):
        if image.rel in seen:
            errors.append(f"entries {seen[image.rel]} and {i} both name image {image.path.name!r}: merge them")
        seen.setdefault(image.rel, i)
    if errors:
        raise AnnotationFormatError(str(path), errors)
    labels = Labels(missing=f"no entry of {name} names this image (an image without objects needs an entry "
                            'with "text": [] and "mask": [])')
    for i, entry in enumerate(entries):
        image = matches.get(i)
        if image is None:
            key = Path(entry["image"]).name
            note = listing.name_notes.get(key) or f"image {entry['image']!r} not found in images/"
            labels.rows[f"{name}#entry {i}"] = ("rejected", note)
            continue
        labels.objects[image.rel] = [
            PlannedObject(text, "annotations", f"{name} entry {i} object {j}", polygons=polygons)
            for j, (text, polygons) in enumerate(zip(entry["text"], entry["mask"]))
        ]
    n_objects = sum(len(e["text"]) for e in entries)
    labels.rows[name] = ("ok", f"Sa2VA annotations: {len(entries)} entries, {n_objects} objects")
    return labels


# ------------------------------------------------------------------------- objects -> annotations
REPORT_COLUMNS = [
    "id", "image", "object", "phrase", "source", "origin", "n_polygons", "n_points", "pixels", "dice", "valid",
    "below_floor",
]


def _object_row(obj: Mapping[str, Any], height: int, width: int, dice_floor: float) -> tuple[list, dict[str, Any]]:
    """Polygons of one ingested object and its report fields.

    A raster object (``mask``: a 0/1 PNG) is encoded as polygons and rasterised back (round-trip Dice);
    a polygon object is kept verbatim: its filled pixel count is reported and it is ``valid`` when every
    polygon fills at least one pixel (Dice is then not applicable: NaN).
    """
    if "mask" in obj:
        mask = read_mask01(obj["mask"])
        if mask.shape != (height, width):
            raise ValueError(
                f"object mask '{obj['mask']}' is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}"
            )
        polygons = mask_to_polygons(mask)
        score = dice(mask, rasterize_polygons(polygons, height, width))
        fields = {"pixels": int(mask.sum()), "dice": round(score, 6), "valid": True,
                  "below_floor": score < dice_floor}
    else:
        polygons = [list(p) for p in obj["polygons"]]
        filled = [int(rasterize_polygons([p], height, width).sum()) for p in polygons]
        pixels = int(rasterize_polygons(polygons, height, width).sum())
        fields = {"pixels": pixels, "dice": float("nan"), "valid": all(filled), "below_floor": False}
    fields.update(n_polygons=len(polygons), n_points=sum(len(p) // 2 for p in polygons))
    return polygons, fields


def annotate_objects(
    manifest: pd.DataFrame, objects: Sequence[Mapping[str, Any]], dice_floor: float
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Build the ONE annotations.json of the ingested data, with one report row per object.

    Args:
        manifest: the ingestion manifest (``id``, ``image`` absolute path, ``width``, ``height``).
        objects: the ingestion objects, one record per manifest row: ``{"id", "image", "objects": [
            {"phrase", "source", "origin", "mask": <0/1 PNG path>} or {..., "polygons": [[x, y, ...]]}]}``.
        dice_floor: raster objects whose polygons reproduce them with a lower Dice are flagged.

    Returns:
        ``(entries, report)``: one entry per manifest row, in manifest order (``image`` = the ingested
        file name; objects in ingestion order, objects sharing a phrase stay separate objects); report
        columns :data:`REPORT_COLUMNS`.

    Raises:
        ValueError: a manifest row has no objects record (the two come from different ingestion runs).
    """
    by_id = {str(rec["id"]): rec for rec in objects}
    entries, rows = [], []
    for row in manifest.itertuples(index=False):
        record = by_id.get(str(row.id))
        if record is None:
            raise ValueError(f"ingestion_objects has no record for manifest id {row.id!r}: re-run ingestion")
        image_name = Path(row.image).name
        entry = {"image": image_name, "text": [], "mask": []}
        for k, obj in enumerate(record["objects"]):
            polygons, fields = _object_row(obj, int(row.height), int(row.width), dice_floor)
            entry["text"].append(obj["phrase"])
            entry["mask"].append(polygons)
            rows.append({"id": str(row.id), "image": image_name, "object": k, "phrase": obj["phrase"],
                         "source": obj["source"], "origin": obj.get("origin", ""), **fields})
        entries.append(entry)
    return entries, pd.DataFrame(rows, columns=REPORT_COLUMNS)
