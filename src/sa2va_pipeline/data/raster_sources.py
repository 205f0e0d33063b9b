"""Label sources that are pictures: binary masks (one folder, or one folder per phrase) and label maps.

Layouts (see :mod:`sa2va_pipeline.data.sources`):

* ``masks/<stem><suffix>.png``: one object per image, its phrase the ``phrase`` parameter;
* ``masks/<phrase>/<stem><suffix>.png``: one object per phrase folder that holds a mask of the image;
* ``labels/<stem>.png`` + ``labels.json`` (``{"1": "blood vessel", "2": "catheter"}``): one object per
  non-zero value present in the image, in value order.

Every mask is decoded once here to check it (header pixel limit, size equal to its image's); the
objects carry a callable that decodes it again at save time, so no more than one mask is in memory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np

from sa2va_pipeline.data.decoding import BadFileError, decode_label_map, decode_mask
from sa2va_pipeline.data.sources import (
    DetectedSource,
    ImageFile,
    ImageListing,
    IngestionConfig,
    Labels,
    PlannedObject,
    SourceError,
    link_problem,
    list_files,
)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _mask_of(path: Path, threshold: int, max_pixels: int | None) -> np.ndarray:
    return decode_mask(path.read_bytes(), threshold, max_pixels)[0]


def _label_value(path: Path, value: int, max_pixels: int | None) -> np.ndarray:
    return (decode_label_map(path.read_bytes(), max_pixels) == value).astype(np.uint8)


def _mask_name_problem(path: Path, suffix: str) -> str | None:
    if path.suffix.lower() != ".png":
        return f"masks must be PNG files named <image stem>{suffix}.png, got '{path.name}'"
    if not path.stem.endswith(suffix) or path.stem == suffix:
        return f"mask name does not end in '{suffix}.png' (expected <image stem>{suffix}.png)"
    return None


def _place_mask(path: Path, masks_dir: Path, layered: bool, config: IngestionConfig) -> tuple[str, str] | str:
    """``(phrase, image stem)`` of a mask file, or the reason it is rejected."""
    depth = len(path.relative_to(masks_dir).parts)
    if depth > 2:
        return "too deeply nested: masks are masks/<stem>_mask.png or masks/<phrase>/<stem>_mask.png"
    if depth == 1 and layered:
        return ("masks/ holds phrase folders (masks/<phrase>/<stem>_mask.png): move this file into the folder "
                "of its phrase")
    problem = _mask_name_problem(path, config.mask_suffix)
    if problem:
        return problem
    phrase = config.phrase if depth == 1 else path.parent.name
    return phrase, path.stem[: len(path.stem) - len(config.mask_suffix)]


def read_masks(root: Path, source: DetectedSource, listing: ImageListing, config: IngestionConfig) -> Labels:
    """Objects of every image from ``masks/`` (one-phrase or phrase-folder layout), with report rows."""
    masks_dir = root / "masks"
    files, refused = list_files(masks_dir, root, config.follow_links_inside) if masks_dir.is_dir() else ([], {})
    layered = any(p.parent != masks_dir for p in files)
    exts = "|".join(e.lstrip(".") for e in config.image_extensions)
    folder = "masks/<phrase>/" if layered else "masks/"
    expected = f"{folder}{{stem}}{config.mask_suffix}.png"
    labels = Labels(missing=f"image without mask: expected {expected}")
    labels.rows.update({_rel(p, root): ("rejected", why) for p, why in refused.items()})
    by_stem = listing.by_stem()
    found: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path in files:
        placed = _place_mask(path, masks_dir, layered, config)
        if isinstance(placed, str):
            labels.rows[_rel(path, root)] = ("rejected", placed)
            continue
        phrase, stem = placed
        image = by_stem.get(stem)
        if image is None:
            note = listing.stem_notes.get(stem, f"mask without image: no images/{stem}.<{exts}>")
            labels.rows[_rel(path, root)] = ("rejected", note)
            continue
        found[image.rel].append((phrase, path))
    for image_rel, masks in found.items():
        _check_masks(listing.accepted[image_rel], sorted(masks), root, config, labels)
    return labels


def _check_masks(image: ImageFile, masks: list[tuple[str, Path]], root: Path, config: IngestionConfig,
                 labels: Labels) -> None:
    """Decode the masks of one image, add its objects or reject it (and every mask of it) with a reason."""
    objects, notes, failure = [], {}, None
    for phrase, path in masks:
        rel = _rel(path, root)
        try:
            mask, fixes = decode_mask(path.read_bytes(), config.mask_threshold, config.max_pixels)
        except BadFileError as exc:
            labels.rows[rel] = ("rejected", str(exc))
            failure = failure or f"its mask was rejected: {rel}"
            continue
        if mask.shape != (image.height, image.width):
            reason = (f"size mismatch: image {image.width}x{image.height}, mask {mask.shape[1]}x{mask.shape[0]} "
                      "(WxH)")
            labels.rows[rel] = ("rejected", reason)
            failure = failure or reason
            continue
        empty = [] if mask.any() else [f"empty mask (no '{phrase}' pixels): kept as an object with no polygons"]
        notes[rel] = ("fixed" if fixes else "ok", "; ".join(fixes + empty))
        objects.append(PlannedObject(phrase, "masks", rel, fixed=bool(fixes),
                                     raster=partial(_mask_of, path, config.mask_threshold, config.max_pixels)))
    if failure:
        labels.bad_images[image.rel] = failure
        for rel in notes:
            labels.rows[rel] = ("rejected", f"its image was rejected: {image.rel} ({failure})")
        return
    labels.rows.update(notes)
    labels.objects[image.rel] = objects


# ------------------------------------------------------------------------------------- label maps
def read_label_mapping(path: Path) -> dict[int, str]:
    """Read ``labels.json``: ``{"<integer value>": "<phrase>", ...}`` (value 0 is the background).

    Raises:
        SourceError: missing file, invalid JSON, a key that is not a positive integer, an empty phrase.
    """
    if not path.is_file():
        raise SourceError(f"label maps need '{path}', a JSON object mapping value -> phrase, e.g. "
                          '{"1": "blood vessel", "2": "catheter"}')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"'{path}' is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise SourceError(f"'{path}' must be a non-empty JSON object mapping value -> phrase")
    problems, mapping = [], {}
    for key, phrase in data.items():
        if not str(key).isdigit() or int(key) <= 0:
            problems.append(f"key {key!r} is not a positive integer value (0 is the background)")
        elif not isinstance(phrase, str) or not phrase.strip():
            problems.append(f"value {key}: the phrase must be a non-empty string, got {phrase!r}")
        else:
            mapping[int(key)] = phrase
    if problems:
        raise SourceError(f"'{path}': " + "; ".join(problems))
    return mapping


def read_label_maps(root: Path, source: DetectedSource, listing: ImageListing, config: IngestionConfig) -> Labels:
    """Objects of every image from ``labels/<stem>.png`` and ``labels.json``, with report rows."""
    mapping_path = root / config.label_map_file
    problem = link_problem(mapping_path, root, config.follow_links_inside)
    if problem:
        raise SourceError(f"'{mapping_path}': {problem}")
    mapping = read_label_mapping(mapping_path)
    folder = root / config.label_maps_dir
    files, refused = list_files(folder, root, config.follow_links_inside) if folder.is_dir() else ([], {})
    labels = Labels(missing=f"image without label map: expected {config.label_maps_dir}/{{stem}}.png")
    labels.rows[_rel(mapping_path, root)] = ("ok", "; ".join(f"{v} = {p}" for v, p in sorted(mapping.items())))
    labels.rows.update({_rel(p, root): ("rejected", why) for p, why in refused.items()})
    by_stem = listing.by_stem()
    for path in files:
        rel = _rel(path, root)
        if path.suffix.lower() != ".png" or path.parent != folder:
            labels.rows[rel] = ("rejected", f"label maps are PNG files {config.label_maps_dir}/<image stem>.png")
            continue
        image = by_stem.get(path.stem)
        if image is None:
            note = listing.stem_notes.get(path.stem, f"label map without image: no images/{path.stem}.<ext>")
            labels.rows[rel] = ("rejected", note)
            continue
        reason = _label_map_objects(path, rel, image, mapping, config, labels)
        if reason:
            labels.rows[rel] = ("rejected", reason)
            labels.bad_images[image.rel] = f"its label map was rejected: {rel}"
    return labels


def _label_map_objects(path: Path, rel: str, image: ImageFile, mapping: dict[int, str], config: IngestionConfig,
                       labels: Labels) -> str | None:
    """Add the objects of one label map; returns the reason it is rejected, or None."""
    try:
        values = decode_label_map(path.read_bytes(), config.max_pixels)
    except BadFileError as exc:
        return str(exc)
    if values.shape != (image.height, image.width):
        return (f"size mismatch: image {image.width}x{image.height}, label map {values.shape[1]}x{values.shape[0]} "
                "(WxH)")
    present = [int(v) for v in np.unique(values) if v != 0]
    unknown = [v for v in present if v not in mapping]
    if unknown:
        return (f"value(s) {unknown} not in {config.label_map_file} (known: {sorted(mapping)}); add them there "
                "or set those pixels to 0")
    labels.objects[image.rel] = [
        PlannedObject(mapping[v], "label_maps", f"{rel} value {v}",
                      raster=partial(_label_value, path, v, config.max_pixels))
        for v in present
    ]
    labels.rows[rel] = ("ok", "" if present else "no labelled pixel: the image has no object")
    return None


__all__ = ["read_label_mapping", "read_label_maps", "read_masks"]
