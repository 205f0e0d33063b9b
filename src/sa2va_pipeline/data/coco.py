"""A COCO instances file as a label source: categories -> phrases, polygons and RLE -> objects.

COCO (``{"images": [...], "annotations": [...], "categories": [...]}``): every annotation is one object
of the image ``image_id`` with the phrase ``categories[category_id].name``. ``segmentation`` is either a
list of flat polygons (kept verbatim, filled as Sa2VA's loader fills them) or an RLE dict (usually with
``iscrowd: 1``; ``counts`` a list = uncompressed, a string = compressed; see :mod:`.rle`): the form of
``segmentation`` decides, not ``iscrowd``. Images are matched to ``images/`` by the file name of
``file_name`` (folders in it are ignored, so nothing outside ``images/`` is ever read).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from numbers import Integral
from pathlib import Path
from typing import Any

from sa2va_pipeline.data.annotations import AnnotationFormatError, polygon_problem
from sa2va_pipeline.data.rle import RleError, decode_rle
from sa2va_pipeline.data.sources import DetectedSource, ImageListing, Labels, PlannedObject


class CocoFormatError(AnnotationFormatError):
    """Malformed COCO content; ``errors`` lists one message per problem (naming image / annotation id)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _coco_images(data: Mapping[str, Any], errors: list[str]) -> dict[Any, tuple[str, int, int]]:
    """COCO image id -> (file name, width, height)."""
    images: dict[Any, tuple[str, int, int]] = {}
    for i, img in enumerate(data["images"] if isinstance(data["images"], list) else []):
        where = f"images[{i}] (id {img.get('id') if isinstance(img, Mapping) else None!r})"
        if not isinstance(img, Mapping) or not all(k in img for k in ("id", "file_name", "width", "height")):
            errors.append(f"{where}: needs id, file_name, width and height")
        elif not isinstance(img["file_name"], str) or not (_is_int(img["width"]) and _is_int(img["height"])):
            errors.append(f"{where}: file_name must be a string, width/height integers")
        elif img["id"] in images:
            errors.append(f"{where}: image id {img['id']!r} appears twice")
        else:
            images[img["id"]] = (Path(img["file_name"]).name, int(img["width"]), int(img["height"]))
    return images


def _coco_categories(data: Mapping[str, Any], errors: list[str]) -> dict[Any, str]:
    """COCO category id -> name (the phrase)."""
    categories: dict[Any, str] = {}
    for i, cat in enumerate(data["categories"] if isinstance(data["categories"], list) else []):
        name = cat.get("name") if isinstance(cat, Mapping) else None
        if "id" not in (cat if isinstance(cat, Mapping) else {}) or not isinstance(name, str) or not name.strip():
            errors.append(f"categories[{i}]: needs an id and a non-empty name (the phrase)")
        else:
            categories[cat["id"]] = cat["name"]
    return categories


def _segmentation(
    ann: Mapping[str, Any], size: tuple[int, int], where: str, errors: list[str]
) -> dict[str, Any] | None:
    """``{"polygons": [...]}`` or ``{"rle": {...}}`` of one annotation, or None (problem appended)."""
    seg = ann.get("segmentation")
    height, width = size
    if isinstance(seg, list):
        problems = [f"polygon {k}: {p}" for k, poly in enumerate(seg) if (p := polygon_problem(poly, size))]
        if problems or not seg:
            errors.extend(f"{where}, {p}" for p in problems or ["segmentation is an empty list"])
            return None
        return {"polygons": [[float(c) for c in poly] for poly in seg]}
    if isinstance(seg, Mapping):
        try:
            decode_rle(seg, height, width)  # checked now; decoded again when the mask is written
        except RleError as exc:
            errors.append(f"{where}: {exc}")
            return None
        return {"rle": seg}
    errors.append(f"{where}: segmentation must be a list of polygons or an RLE dict, got {type(seg).__name__}")
    return None


def _match_images(coco_images: dict[Any, tuple[str, int, int]], listing: ImageListing, name: str,
                  labels: Labels, errors: list[str]) -> dict[Any, Any]:
    """COCO image id -> ingested image; rows for COCO images absent from images/, size mismatches."""
    by_name = listing.by_name()
    matched: dict[Any, Any] = {}
    owner: dict[str, Any] = {}
    for image_id, (file_name, width, height) in coco_images.items():
        image = by_name.get(file_name)
        if image is None:
            note = listing.name_notes.get(file_name) or f"'{file_name}' not found in images/"
            labels.rows[f"{name}#image {image_id}"] = ("rejected", note)
        elif image.rel in owner:
            errors.append(f"images: ids {owner[image.rel]!r} and {image_id!r} both name '{file_name}'")
        elif (width, height) != (image.width, image.height):
            labels.bad_images[image.rel] = (f"size mismatch: image {image.width}x{image.height}, {name} image id "
                                            f"{image_id!r} says {width}x{height} (WxH)")
            owner[image.rel] = image_id
        else:
            owner[image.rel] = image_id
            matched[image_id] = image
            labels.objects[image.rel] = []
    return matched


def read_coco_labels(root: Path, source: DetectedSource, listing: ImageListing, config: Any = None) -> Labels:
    """Objects of every image from a COCO instances file, with report rows.

    Raises:
        CocoFormatError: every problem listed (missing keys, unknown image/category ids, malformed or
            out-of-image polygons, RLE whose size or counts do not fit the image), each naming the
            annotation (index, id, image, category).
    """
    path, data = source.evidence[0], source.data
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    errors = [f"'{key}' must be a list" for key in ("images", "annotations", "categories")
              if not isinstance(data[key], list)]
    coco_images = _coco_images(data, errors)
    categories = _coco_categories(data, errors)
    labels = Labels(missing=f"not listed in the images of {name}")
    matched = _match_images(coco_images, listing, name, labels, errors)
    annotations = data["annotations"] if isinstance(data["annotations"], list) else []
    for k, ann in enumerate(annotations):
        ann = ann if isinstance(ann, Mapping) else {}
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        where = f"annotations[{k}] (id {ann.get('id')!r}, image id {image_id!r}, category id {category_id!r})"
        if image_id not in coco_images or category_id not in categories:
            errors.append(f"{where}: unknown image_id or category_id (not in images / categories)")
            continue
        file_name, width, height = coco_images[image_id]
        seg = _segmentation(ann, (height, width), f"{where} of '{file_name}'", errors)
        image = matched.get(image_id)
        if seg is None or image is None:
            continue
        origin = f"{name} annotation id {ann.get('id')!r}"
        phrase = categories[category_id]
        if "polygons" in seg:
            obj = PlannedObject(phrase, "coco_polygons", origin, polygons=seg["polygons"])
        else:
            obj = PlannedObject(phrase, "coco_rle", origin, raster=partial(decode_rle, seg["rle"], height, width))
        labels.objects[image.rel].append(obj)
    if errors:
        raise CocoFormatError(str(path), errors)
    labels.rows[name] = ("ok", f"COCO: {len(coco_images)} images, {len(annotations)} annotations, "
                               f"{len(categories)} categories ({', '.join(sorted(set(categories.values())))})")
    return labels


__all__ = ["CocoFormatError", "read_coco_labels"]
